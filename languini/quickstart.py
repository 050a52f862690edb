"""`languini quickstart`: from a fresh install to a trained and evaluated language model in minutes.

    languini quickstart [--steps N] [--out runs/quickstart] [--project gpt] [--device cpu] [--overwrite]

1. prepares the demo corpus (Shakespeare's plays, vocabulary 4096) unless it is already there,
2. trains the project's `nano` preset for N steps (default 600, a few minutes on two CPU cores),
3. evaluates the final model on the demo test split and prints its normalised perplexity,
4. draws the loss curve as <out>/loss_curve.png.

Running it again with the same --steps continues the run in --out if it was interrupted (if it had
finished, no step is trained again: the model is only re-evaluated and the curve redrawn). A run in --out
with other --steps or --project is never replaced without --overwrite (which then removes only that run's
own files).
"""

import argparse
import json
import os
import sys
import time

from languini.common_lib.errors import OneLineArgumentParser, UserError, exit_on_user_error
from languini.dataset_lib.layout import check_dataset
from languini.projects import load_project
from languini.report_lib.plots import plot_learning_curves
from languini.report_lib.runs import load_run
from languini.train_lib.eval_command import run_eval
from languini.train_lib.loggers import read_metrics
from languini.train_lib.train_command import run_training

PRESET = "nano"
DEFAULT_STEPS = 600
DEFAULT_OUT = os.path.join("runs", "quickstart")
EVAL_SPLIT = "test"


def ensure_demo_data(cfg) -> str:
    """The dataset folder of the `nano` preset, preparing the demo corpus first when it is missing."""
    try:
        path = check_dataset(cfg.data_root, cfg.dataset, cfg.vocab_size)
        print(f"[1/4] demo corpus found in {path}")
        return path
    except UserError:
        print(f"[1/4] preparing the demo corpus into {os.path.join(cfg.data_root, cfg.dataset)}", flush=True)
    from languini.dataset_lib import cli as data_cli

    code = data_cli.main(["prepare", "demo"])
    if code:
        raise UserError(f"`languini data prepare demo` failed (exit code {code})")
    return check_dataset(cfg.data_root, cfg.dataset, cfg.vocab_size)


def reuse_flags(out: str, project: str, steps: int, overwrite: bool) -> list[str]:
    """Flags for a previous quickstart run in `out`: continue it when it is the same run; replace another
    run only with `overwrite`."""
    config_path = os.path.join(out, "config.json")
    has_checkpoint = os.path.isfile(os.path.join(out, "checkpoints", "latest.pt"))
    if not os.path.exists(config_path) and not has_checkpoint:
        return []
    previous = {}
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                previous = json.load(f)
        except ValueError:
            raise UserError(f"{config_path} is unreadable; choose another --out") from None
        if not isinstance(previous, dict):
            raise UserError(f"{config_path} does not hold a run's config; choose another --out")
    if previous.get("preset", PRESET) != PRESET:
        raise UserError(
            f"{out} holds a '{previous.get('preset')}' run, not a quickstart run; choose another --out"
        )
    if overwrite:
        print(f"replacing the previous run in {out} (--overwrite)")
        return ["--overwrite"]
    same = previous.get("project") == project and previous.get("max_train_steps") == steps
    if same and has_checkpoint:
        print(f"continuing the quickstart run in {out} (pass --overwrite to start over)")
        return ["--resume", "auto"]
    if same:  # stopped before its first checkpoint: nothing to continue from, nothing finished to lose
        print(f"starting the unfinished quickstart run in {out} again (it stopped before its first checkpoint)")
        return ["--overwrite"]
    done = max((r["step"] for r in read_metrics(out) if isinstance(r.get("step"), int)), default=0)
    planned = previous.get("max_train_steps")
    state = "finished" if planned and done >= planned else f"stopped at step {done}"
    raise UserError(
        f"{out} holds another quickstart run ({previous.get('project', '?')}, {planned} steps, {state}); "
        "pass --overwrite to replace it, or choose another --out"
    )


def train_flags(cfg, out: str, steps: int, device: str) -> list[str]:
    """The `nano` preset with the schedule fitted to `steps` (warm-up at most a fifth of the run)."""
    warmup = min(cfg.warmup_steps, max(1, steps // 5))
    flags = dict(
        run_dir=out, max_train_steps=steps, decay_steps=steps, warmup_steps=warmup, device=device,
        logger_type="none", eval_every=min(cfg.eval_every, steps),
        log_ckpt_every=min(cfg.log_ckpt_every, steps),
    )  # fmt: skip
    return [PRESET] + [part for name, value in flags.items() for part in (f"--{name}", str(value))]


@exit_on_user_error
def main(argv=None):
    parser = OneLineArgumentParser(
        prog="languini quickstart",
        description="Prepare the demo corpus, train the `nano` preset on CPU, evaluate it, plot its loss.",
    )
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (default {DEFAULT_STEPS})"
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"run folder (default {DEFAULT_OUT})")
    parser.add_argument(
        "--project", default="gpt", help="project to train (needs a `nano` preset; default gpt)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="default cpu")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the run in --out (its own files only) and start over"
    )
    parser.add_argument("--fresh", dest="overwrite", action="store_true", help=argparse.SUPPRESS)  # older name
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")

    start = time.time()
    spec = load_project(args.project)
    cfg = spec.preset_config(PRESET)
    ensure_demo_data(cfg)

    print(
        f"[2/4] training {args.project} {PRESET} for {args.steps} steps on {args.device} in {args.out}",
        flush=True,
    )
    flags = train_flags(cfg, args.out, args.steps, args.device) + reuse_flags(
        args.out, args.project, args.steps, args.overwrite
    )
    code = run_training(spec, flags)
    if code in (130, 143):  # stopped by Ctrl-C / SIGTERM after a checkpoint
        print(f"for the quick start: run `languini quickstart --steps {args.steps} --out {args.out}` again to continue")
    if code:
        return code

    print(f"[3/4] evaluating on the demo {EVAL_SPLIT} split", flush=True)
    code = run_eval(spec, ["--run_dir", args.out, "--eval_data_split", EVAL_SPLIT])
    if code:
        return code
    with open(os.path.join(args.out, "eval", f"{EVAL_SPLIT}.json")) as f:
        result = json.load(f)

    curve = os.path.join(args.out, "loss_curve.png")
    print("[4/4] drawing the loss curve", flush=True)
    plot_learning_curves([load_run(args.out)], curve, x="step")
    print(
        f"\nnormalised perplexity on the demo {EVAL_SPLIT} split: {result['normalised_ppl']:.4f} "
        f"(bits per byte {result['bits_per_byte']:.4f}, {result['n_tokens']:,} tokens)\n"
        f"run folder: {args.out}\nloss curve: {curve}\ntotal time: {time.time() - start:.0f} s\n"
        f"next: `languini report {args.out}` compares runs; the README's guide trains the real presets."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
