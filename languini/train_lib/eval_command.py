"""The final evaluation of a trained run, shared by every project's `eval.py`.

    eval.py --run_dir DIR [--checkpoint PATH] [--eval_data_split S|all] [--last_n N] [--max_tokens N]
            [--eval_streams B] [--config_flag value ...]
    eval.py --checkpoint PATH --config PATH [...]
    eval.py --bundle DIR [...]

Loads `DIR/config.json` and `DIR/checkpoints/latest.pt`, scores each split with the project's protocol
(`eval_protocols.PROTOCOLS`), prints a table and writes `DIR/eval/<split>.json` (with --config only: next to
the config file; with --bundle: a verified bundle's config and weights, results in `DIR.eval/` beside the
bundle, compared with the bundle's own results). `--max_tokens N` scores only the first N tokens of each
split's stream; `--eval_streams B` (stateful models) reads the split as B streams dealt like the training
loader's, batched. Both are recorded in the results. Any config flag overrides the run's config (e.g. --test_batch_size, --device,
--precision, --data_root). Under torchrun the work is split across the processes and the sums added.

The checkpoint is read safely (tensors and plain data only). A run is scored only on the corpus it trained
on (its recorded corpus identity) unless --allow_other_corpus is given; such a result goes to
`eval/<split>@<dataset>.json`, never to the run's own `eval/<split>.json`, and records `other_corpus`.
Every flag is checked before anything is printed or loaded.
"""

import os
import sys
import time

import torch

from languini.common_lib.atomic_io import atomic_write_json
from languini.common_lib.config import apply_overrides, parse_flags, split_tool_flags
from languini.common_lib.device import autocast_context, configure_device, resolve_device, resolve_precision
from languini.common_lib.errors import UserError
from languini.dataset_lib import layout
from languini.dataset_lib.languini_books import read_split_tokens
from languini.train_lib import bundle, run_folder
from languini.train_lib.checkpoint import load_model_state, load_model_weights
from languini.train_lib.distributed import init_distributed, shutdown_distributed, world_from_env
from languini.train_lib.eval_metrics import all_reduce_sums, metrics_from_sums
from languini.train_lib.eval_protocols import PROTOCOLS, cap_tokens, check_last_n
from languini.train_lib.project_spec import ProjectSpec
from languini.train_lib.run_folder import CHECKPOINT_NAME
from languini.train_lib.token_lengths import load_token_lengths
from languini.train_lib.train_config import check_config

EVAL_FLAGS = {  # eval's own flags, taken out before the config flags
    "run_dir": (str, "", "the run folder (config.json, checkpoints/latest.pt)"),
    "checkpoint": (str, "", "a checkpoint file instead of the run folder's"),
    "config": (str, "", "a config.json instead of the run folder's"),
    "allow_other_corpus": (bool, False, "score the run on a corpus other than the one it trained on"),
    "bundle": (str, "", "a bundle written by `languini export` instead of a run folder"),
    "max_tokens": (int, 0, "score only the first N tokens of each split's stream (0: all)"),
    "eval_streams": (int, 1, "stateful models: read each split as B streams, dealt like the training loader's"),
}
USAGE = """usage: eval.py --run_dir DIR [--checkpoint PATH] [--eval_data_split S|all] [--last_n N] [--max_tokens N]
               [--eval_streams B] [--flags]
       eval.py --checkpoint PATH --config PATH [...]
       eval.py --bundle DIR [...]

  --run_dir DIR          run folder: reads DIR/config.json and DIR/checkpoints/latest.pt, writes DIR/eval/
  --checkpoint PATH      checkpoint to evaluate instead of DIR/checkpoints/latest.pt
  --config PATH          config.json to use (results go to its folder's eval/ when no --run_dir)
  --bundle DIR           a bundle from `languini export` (verified first); results go to DIR.eval/ and are
                         compared with the bundle's own eval/ results
  --eval_data_split S    a split name, or 'all' for every test split present (default: the config's, 'test')
  --last_n N             GPT sliding window: tokens scored at the end of each window (default: the
                         run's config, 128 of 512 in the full presets, 32 of 128 in nano)
  --test_batch_size N    windows per forward pass
  --max_tokens N         score only the first N tokens of each split's stream, books in file-list order
                         (default 0: all); recorded in the JSON with the n_tokens scored
  --eval_streams B       stateful models (lstm): deal the books to B streams as the training loader does,
                         each carrying its own state from zero, read as B rows per chunk (default 1: the
                         whole split as one stream); sliding-window models accept only 1
  --allow_other_corpus   score the run on a corpus other than the one it trained on (recorded in the JSON)
  any other config flag (e.g. --device cpu, --precision fp32, --data_root PATH) overrides the run's config"""

TABLE_COLUMNS = [
    ("split", "{}"), ("n_tokens", "{:,}"), ("n_chars", "{:,}"), ("loss", "{:.4f}"), ("ppl", "{:.2f}"),
    ("normalised_loss", "{:.4f}"), ("normalised_ppl", "{:.4f}"), ("bits_per_byte", "{:.4f}"),
    ("top1", "{:.4f}"), ("top10", "{:.4f}"),
]  # fmt: skip


def _locate(own: dict) -> tuple[str, str, str]:
    """(config path, checkpoint path, output folder) from the eval flags, with clear errors."""
    run_dir = own.get("run_dir")
    if own.get("bundle"):
        if run_dir or own.get("checkpoint") or own.get("config"):
            raise UserError("--bundle holds its own config and weights: drop --run_dir, --checkpoint and --config")
        if not os.path.isdir(own["bundle"]):
            raise UserError(f"no bundle folder at {own['bundle']}")
        folder = os.path.normpath(own["bundle"])
        return os.path.join(folder, bundle.CONFIG), folder, folder + ".eval"
    if run_dir:
        if not os.path.isdir(run_dir):
            raise UserError(f"no run folder at {run_dir}")
        config = own.get("config") or os.path.join(run_dir, "config.json")
        checkpoint = own.get("checkpoint") or os.path.join(run_dir, "checkpoints", CHECKPOINT_NAME)
        out_dir = run_dir
    elif own.get("config") and own.get("checkpoint"):
        config, checkpoint = own["config"], own["checkpoint"]
        out_dir = os.path.dirname(os.path.abspath(config))
    else:
        raise UserError("pass --run_dir DIR, or --checkpoint PATH and --config PATH (see --help)")
    if not os.path.isfile(config):
        raise UserError(f"no config at {config}")
    if not os.path.isfile(checkpoint):
        raise UserError(f"no checkpoint at {checkpoint}; train the run first or pass --checkpoint PATH")
    return config, checkpoint, out_dir


def _splits(dataset_path: str, data_root: str, requested: str) -> list[str]:
    """The splits to score; unknown names raise the layout's error (which lists the present splits), and a
    split without tokens is named. The name (from a flag, a run's config or a shared bundle's) must be a safe
    identifier: it names the file list read and the result file written."""
    layout.check_safe_name(requested, "eval_data_split")
    if requested == "all":
        splits = layout.test_splits(data_root)
        if not splits:
            raise UserError(f"no test splits under {data_root}")
    else:
        splits = [requested]
    for split in splits:
        if sum(count for _, count in layout.read_books(dataset_path, split)) == 0:
            raise UserError(
                f"split '{split}' of {dataset_path} is empty (its file list "
                f"{os.path.join(data_root, layout.split_list_name(split))} names no tokens): nothing to score"
            )
    return splits


def _result_path(out_dir: str, split: str, other_dataset: str | None = None) -> str:
    """`out_dir/eval/<split>.json`, or `<split>@<dataset>.json` for a result on another corpus than the run's
    (so it never replaces, nor reads as, the run's own result); refused if it would lead out of
    `out_dir/eval` (a crafted split name)."""
    name = split if other_dataset is None else f"{split}@{other_dataset}"
    return layout.path_inside(os.path.join(out_dir, "eval"), f"{name}.json", "eval result")


def _verified_bundle_weights(spec: ProjectSpec, folder: str) -> dict[str, torch.Tensor]:
    """The weights of the bundle in `folder`, verified (hashes, contents, fit to this project's model) before
    its config is read for anything else."""

    def meta_model(_config: dict):
        cfg = spec.load_run_config(os.path.join(folder, bundle.CONFIG))  # another project's bundle: one line
        with torch.device("meta"):
            return spec.Model(cfg)

    return bundle.load_bundle(folder, meta_model)[1]


def _bundle_model(
    spec: ProjectSpec, cfg, folder: str, weights: dict, device
) -> tuple[torch.nn.Module, int | None, dict | None]:
    """The model with the bundle's (verified) weights, the step its results were measured at, its corpus."""
    model = spec.Model(cfg)
    load_model_state(model, weights, folder)
    steps = [r.get("checkpoint_step") for r in bundle.read_eval_results(folder).values()]
    return model.to(device).eval(), steps[0] if steps else None, run_folder.read_corpus(folder)


def _compare_with_bundle(result: dict, shared: dict | None) -> str:
    """One line: does this result reproduce the bundle's own result of the split?"""
    if shared is None:
        return f"{result['split']}: the bundle has no result for this split"
    setting = [k for k in ("protocol", "last_n", "eval_streams", "max_tokens")
               if result.get(k) != shared.get(k, {"eval_streams": 1, "max_tokens": 0}.get(k))]
    if setting:
        how = "; ".join(f"{k} {result.get(k)} vs {shared.get(k)}" for k in setting)
        return f"{result['split']}: scored with another protocol than the bundle's result ({how}): not comparable"
    keys = [k for k in ("n_tokens", "loss", "normalised_ppl", "bits_per_byte", "top1", "top10") if k in shared]
    differ = [f"{k} {result.get(k)} vs {shared[k]}" for k in keys if result.get(k) != shared[k]]
    if not differ:
        return f"{result['split']}: reproduces the bundle's result exactly"
    return f"{result['split']}: differs from the bundle's result ({'; '.join(differ)})"


def _load_model(Model, cfg, checkpoint: str, device) -> tuple[torch.nn.Module, int | None, dict | None]:
    """The model with the checkpoint's weights, the checkpoint's step and its recorded corpus identity."""
    model = Model(cfg)
    saved = load_model_weights(model, checkpoint)
    step, corpus = saved.get("step"), saved.get("corpus")
    return model.to(device).eval(), step if isinstance(step, int) else None, corpus if isinstance(corpus, dict) else None


def _corpus_check(
    recorded: dict | None, identity: dict, dataset_path: str, allow_other: bool, where: str, announce: bool
) -> bool:
    """True when the run is scored on another corpus than it trained on (allowed by --allow_other_corpus);
    refuses that without the flag. A run without a recorded identity (an older run) gets a warning."""
    if recorded is None:
        if announce:
            print(
                f"warning: {where} records no corpus identity (an older run); cannot check that {dataset_path} "
                "is the corpus it trained on",
                file=sys.stderr,
            )
        return False
    differs = run_folder.corpus_differences(recorded, identity)
    if differs and not allow_other:
        raise UserError(
            f"{where} was trained on another corpus than {dataset_path} (the {' and '.join(differs)} differ); "
            "pass --allow_other_corpus to score it there anyway"
        )
    return bool(differs)


def _format_table(rows: list[dict]) -> str:
    def cell(fmt, value):
        return "-" if value is None else fmt.format(value)

    cells = [[name for name, _ in TABLE_COLUMNS]] + [[cell(f, r[n]) for n, f in TABLE_COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def check_eval_options(protocol: str, max_tokens: int, eval_streams: int, last_n: int, seq_len: int):
    """One-line errors for --max_tokens, --eval_streams and --last_n values that cannot be used."""
    if protocol != "stateful":
        check_last_n(last_n, seq_len)
    if max_tokens < 0:
        raise UserError(f"--max_tokens must be 0 (all tokens) or positive; got {max_tokens}")
    if max_tokens == 1:
        raise UserError("--max_tokens 1 leaves no target to score (the first token has no context); use 2 or more")
    if eval_streams < 1:
        raise UserError(f"--eval_streams must be at least 1; got {eval_streams}")
    if eval_streams != 1 and protocol != "stateful":
        raise UserError(
            f"--eval_streams applies to stateful models only; the {protocol} protocol scores independent "
            "windows of one stream (batch them with --test_batch_size)"
        )


def protocol_record(protocol: str, last_n: int, max_tokens: int, eval_streams: int) -> dict:
    """The fields of an eval JSON that say how the split was scored (compared by `languini report`)."""
    return {
        "protocol": protocol,
        "last_n": last_n if protocol != "stateful" else None,
        "eval_streams": eval_streams,
        "state_resets": "every window" if protocol != "stateful" else "at the start of each stream",
        "max_tokens": max_tokens,
    }


def _score_split(model, cfg, protocol, dataset_path, split, lengths, precision, device, world,
                 max_tokens: int = 0, eval_streams: int = 1) -> dict:
    """The metrics of one split: `protocol` on every process, the sums added across processes."""
    tokens = cap_tokens(read_split_tokens(dataset_path, split), max_tokens)
    extra = {}
    if protocol == "stateful":
        extra = {"n_streams": eval_streams, "book_lengths": [n for _, n in layout.read_books(dataset_path, split)]}
    sums = PROTOCOLS[protocol](
        model, tokens, cfg.seq_len, cfg.last_n, cfg.test_batch_size, autocast_context(precision, device),
        lengths=lengths, rank=world.rank, world_size=world.size, progress=world.is_main, **extra,
    )  # fmt: skip
    return metrics_from_sums(all_reduce_sums(sums, world), with_chars=lengths is not None)


def run_eval(spec: ProjectSpec, argv) -> int:
    """The body of a project's `eval.py`: evaluate a run with the project's model and eval protocol."""
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    own, rest = split_tool_flags(argv, EVAL_FLAGS)
    config_path, checkpoint, out_dir = _locate(own)
    weights = _verified_bundle_weights(spec, checkpoint) if own.get("bundle") else None
    cfg = spec.load_run_config(config_path)
    cfg = apply_overrides(cfg, parse_flags(spec.Config, rest, tuple(EVAL_FLAGS)))
    protocol, Model = spec.eval_protocol, spec.Model
    check_config(cfg)
    check_eval_options(protocol, own["max_tokens"], own["eval_streams"], cfg.last_n, cfg.seq_len)
    dataset_path = layout.check_dataset(cfg.data_root, cfg.dataset, cfg.vocab_size)
    splits = _splits(dataset_path, cfg.data_root, cfg.eval_data_split)
    identity = layout.corpus_identity(dataset_path)
    world = world_from_env()
    device = resolve_device(cfg.device, world.local_rank)
    precision = resolve_precision(cfg.precision, device)
    configure_device(device)
    init_distributed(world, device)
    try:
        if weights is not None:
            model, step, recorded = _bundle_model(spec, cfg, checkpoint, weights, device)
        else:
            model, step, recorded = _load_model(Model, cfg, checkpoint, device)
        run_dir = own.get("run_dir") or os.path.dirname(os.path.abspath(config_path))
        if recorded is None:
            recorded = run_folder.read_corpus(run_dir)
        other_corpus = _corpus_check(
            recorded, identity, dataset_path, own["allow_other_corpus"], own.get("run_dir") or checkpoint, world.is_main
        )
        other_dataset = os.path.basename(os.path.normpath(dataset_path)) if other_corpus else None
        lengths = load_token_lengths(dataset_path, cfg.vocab_size)
        if world.is_main:
            print(f"evaluating {checkpoint} (step {step}) on {device}, {precision}, {world.size} process(es)")
            window = f", last_n {cfg.last_n}, {cfg.test_batch_size} windows per batch"
            streams = f", {own['eval_streams']} stream(s)" if protocol == "stateful" else ""
            cap = f", first {own['max_tokens']:,} tokens of each split" if own["max_tokens"] else ""
            print(f"protocol {protocol}: seq_len {cfg.seq_len}{window if protocol != 'stateful' else streams}{cap}")
            if lengths is None:
                print(f"no tokenizer.model in {dataset_path}: character and byte metrics are not computed")
        lengths = None if lengths is None else lengths.to(device)
        rows = []
        for split in splits:
            started = time.time()
            metrics = _score_split(
                model, cfg, protocol, dataset_path, split, lengths, precision, device, world,
                own["max_tokens"], own["eval_streams"],
            )
            result = {
                "split": split, **metrics,
                **protocol_record(protocol, cfg.last_n, own["max_tokens"], own["eval_streams"]),
                "checkpoint_step": step, "seq_len": cfg.seq_len, "checkpoint": checkpoint,
                "seconds": round(time.time() - started, 3), "other_corpus": other_corpus, "corpus": identity,
            }  # fmt: skip
            if world.is_main:
                atomic_write_json(_result_path(out_dir, split, other_dataset), result)
            rows.append(result)
    finally:
        shutdown_distributed()
    if world.is_main:
        print(_format_table(rows))
        if own.get("bundle"):
            shared = bundle.read_eval_results(checkpoint)
            for row in rows:
                print(_compare_with_bundle(row, shared.get(row["split"])))
        other = f" as <split>@{other_dataset}.json (another corpus: the run's own results stay)" if other_dataset else ""
        print(f"results written to {os.path.join(out_dir, 'eval')}/{other}")
    return 0
