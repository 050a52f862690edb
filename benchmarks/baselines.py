"""The kitchen's own equal-compute table: every baseline at the nano size, trained for the same FLOP budget.

    python3 benchmarks/baselines.py [--flops 3e12] [--data_root data/demo --dataset demo_4096]
                                    [--out runs/baselines] [--doc FILE]

For each model (GPT, quasi-LSTM, Transformer++, gated DeltaNet, GPT with Muon) the steps come from the
budget and the model's counted FLOPs per token (what `languini steps PROJECT nano --flops F` prints), then
it trains on the CPU, is evaluated on the test split with its project's protocol, and the table (with the
budget, seed and wall times) is printed as markdown and JSON; `--doc` also writes the markdown to a file.
`languini report` over the run folders draws the curves and the scaling plot.
"""

import argparse
import json
import os
import sys
import time

from languini.common_lib.atomic_io import atomic_write_text
from languini.projects import load_project
from languini.tools.compute_classes import steps_for_flops
from languini.tools.flops import count_step_flops, param_counts
from languini.train_lib.eval_command import run_eval
from languini.train_lib.train_command import run_training

# (label, project, extra config flags)
MODELS = [
    ("GPT", "gpt", []),
    ("quasi-LSTM", "lstm", []),
    ("Transformer++", "transformerpp", []),
    ("gated DeltaNet", "deltanet", []),
    ("GPT + Muon", "gpt", ["--optimizer", "muon"]),
]


def train_and_evaluate(label, project, extra, args) -> dict:
    spec = load_project(project)
    base = ["nano", "--data_root", args.data_root, "--dataset", args.dataset,
            "--train_batch_size", str(args.train_batch_size), "--seed", str(args.seed), "--device", "cpu", *extra]  # fmt: skip
    cfg = spec.parse_config(base, "baselines")
    per_token = count_step_flops(project, cfg).forward_backward_per_token
    steps = steps_for_flops(args.flops, per_token, cfg.train_batch_size, cfg.seq_len)
    run_dir = os.path.join(args.out, label.lower().replace(" ", "_").replace("+", "plus"))
    flags = [*base, "--max_train_steps", str(steps), "--run_dir", run_dir, "--eval_every", "0",
             "--logger_type", "none", "--no-progress_bar", "--log_terminal_every", "1000", "--overwrite"]  # fmt: skip
    started = time.time()
    if run_training(spec, flags) != 0:
        raise SystemExit(f"training {label} failed")
    train_s = time.time() - started
    eval_flags = ["--run_dir", run_dir, "--eval_data_split", "test"]
    if spec.eval_protocol == "stateful":
        eval_flags += ["--eval_streams", str(args.eval_streams)]
    started = time.time()
    if run_eval(spec, eval_flags) != 0:
        raise SystemExit(f"evaluating {label} failed")
    with open(os.path.join(run_dir, "eval", "test.json")) as f:
        result = json.load(f)
    return {
        "model": label, "project": project, "flags": " ".join(extra), "run_dir": run_dir,
        "params": param_counts(spec.Model(cfg), cfg.vocab_size)[0], "flops_per_token": per_token, "steps": steps,
        "tokens": steps * cfg.train_batch_size * cfg.seq_len, "train_seconds": round(train_s, 1),
        "eval_seconds": round(time.time() - started, 1), "normalised_ppl": result["normalised_ppl"],
        "bits_per_byte": result.get("bits_per_byte"), "protocol": result["protocol"],
        "eval_streams": result.get("eval_streams"),
    }  # fmt: skip


def _number(value) -> str:
    """Four decimals, or a dash for a figure the corpus cannot give (no character or byte counts)."""
    return "–" if value is None else f"{value:.4f}"


def markdown(rows: list[dict], args) -> str:
    lines = [
        f"Budget {args.flops:.3g} training FLOPs (fwd+bwd, torch.utils.flop_counter) per model, nano presets, "
        f"batch {args.train_batch_size}, seed {args.seed}, test split of {args.dataset}; CPU wall times.",
        "",
        "| model | params | FLOPs/token | steps | tokens | train s | eval s | normalised ppl | bits/byte | eval protocol |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        protocol = r["protocol"] + (f", {r['eval_streams']} streams" if r["protocol"] == "stateful" else "")
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['flops_per_token'] / 1e6:.2f} M | {r['steps']:,} | "
            f"{r['tokens']:,} | {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} | {_number(r['normalised_ppl'])} | "
            f"{_number(r['bits_per_byte'])} | {protocol} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--flops", type=float, default=3e12, help="training FLOPs per model (default 3e12)")
    parser.add_argument("--data_root", default="data/demo", help="the corpus folder (languini data prepare ...)")
    parser.add_argument("--dataset", default="demo_4096", help="the dataset in it, with a 4096-token vocabulary")
    parser.add_argument("--out", default="runs/baselines", help="folder for the run folders")
    parser.add_argument("--train_batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_streams", type=int, default=8, help="streams of the stateful evaluation")
    parser.add_argument("--only", nargs="*", help="labels of the models to run (default: all)")
    parser.add_argument("--doc", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    rows = [train_and_evaluate(label, project, extra, args) for label, project, extra in MODELS
            if not args.only or label in args.only]  # fmt: skip
    table = markdown(rows, args)
    print(table)
    print(json.dumps({"flops": args.flops, "seed": args.seed, "rows": rows}, indent=2))
    if args.doc:
        atomic_write_text(args.doc, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
