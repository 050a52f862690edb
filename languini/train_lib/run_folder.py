"""The run folder: where a run keeps its config, environment, metrics and checkpoints (docs/training.md).

    runs/<project>/<exp_name>/  config.json env.json command.txt source.zip corpus.json metrics.jsonl
                                checkpoints/latest.pt  tensorboard/  wandb/  eval/  .languini.lock

A folder that already holds a run is never reused silently: `--resume auto` continues it, `--overwrite`
replaces it, anything else is a UserError (never an interactive prompt). `--overwrite` removes exactly the
files a run writes, by name; files the user put in the folder (even inside checkpoints/ or tensorboard/)
stay. The caller holds the folder's lock (`.languini.lock`, common_lib/file_lock.py) while it claims it.
"""

import contextlib
import datetime
import io
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import zipfile

import torch

from languini.common_lib.atomic_io import atomic_write_bytes, atomic_write_json, atomic_write_text
from languini.common_lib.config import config_to_dict, read_config_json, save_config
from languini.common_lib.errors import UserError
from languini.train_lib.checkpoint import remove_sharded_folders

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT_NAME = "latest.pt"
CORPUS_FILE = "corpus.json"
# What a run writes at its top level; `--overwrite` removes exactly these (and, below, the checkpoint, the
# tensorboard events, the wandb run and eval results it wrote), nothing else the user may have put there.
RUN_FILES = ("config.json", "env.json", "command.txt", "source.zip", CORPUS_FILE, "metrics.jsonl", "wandb_id.txt")
# Folders the run writes into: removed by --overwrite only when nothing of the user's is left in them.
RUN_DIRS = ("checkpoints", "tensorboard", "wandb", "eval")
TENSORBOARD_EVENTS = re.compile(r"events\.out\.tfevents\.\d+\..+")  # the names SummaryWriter gives its files
WANDB_LINKS = ("latest-run", "debug.log", "debug-internal.log")  # symlinks wandb keeps beside its runs


# Fields a resumed run may change: they steer logging, evaluation and hardware, not what is trained (the
# global batch stays; how it splits over processes and micro-steps may change).
RESUMABLE_CHANGES = {
    "resume", "overwrite", "exp_name", "run_dir", "debug", "data_root", "max_train_steps", "device",
    "precision", "compile", "eval_every", "eval_batch_size", "max_eval_steps", "test_batch_size", "last_n",
    "eval_data_split", "tokens_per_second", "log_terminal_every", "log_metrics_every", "log_grads_every",
    "log_ckpt_every", "ckpt_every_minutes", "logger_type", "wandb_project_name", "progress_bar",
    "gradient_accumulation_steps", "parallel", "activation_checkpointing",
}  # fmt: skip


def default_exp_name(cfg) -> str:
    """A readable name from the config, stable across restarts so `--resume auto` finds the folder."""
    # decay_steps, not max_train_steps: a resumed run may extend max_train_steps and must find its folder
    name = f"{cfg.preset or 'custom'}_bsz{cfg.train_batch_size}_sl{cfg.seq_len}_decay{cfg.decay_steps}"
    return name + ("_debug" if cfg.debug else "")


def resolve_run_dir(cfg) -> str:
    """`--run_dir`, else runs/<project>/<exp_name> (exp_name derived from the config when empty)."""
    if cfg.run_dir:
        return cfg.run_dir
    exp_name = cfg.exp_name or default_exp_name(cfg)
    if cfg.debug and cfg.exp_name:
        exp_name += "_debug"
    return os.path.join("runs", cfg.project or "project", exp_name)


def checkpoint_path(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints", CHECKPOINT_NAME)


def _json_object(path: str) -> dict | None:
    """The JSON object in `path`, or None when it is missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# What marks config.json and env.json as a run's own (a user's file of the same name lacks these keys).
CONFIG_SIGNATURE = {"project", "dataset", "seq_len", "seed", "max_train_steps"}
ENV_SIGNATURE = {"git_revision", "torch_version", "start_time", "command"}


def holds_run(run_dir: str) -> bool:
    """True when a run wrote into `run_dir`: its checkpoint, or a config.json / env.json with a run's keys.

    The lock file, an empty checkpoints/ or files that merely share a run file's name are not a run.
    """
    config = _json_object(os.path.join(run_dir, "config.json")) or {}
    env = _json_object(os.path.join(run_dir, "env.json")) or {}
    return (
        os.path.isfile(checkpoint_path(run_dir)) or CONFIG_SIGNATURE <= set(config) or ENV_SIGNATURE <= set(env)
    )


def _has_metrics(run_dir: str) -> bool:
    """True when the run logged at least one metrics record (it trained, or validated, for a while)."""
    try:
        return os.path.getsize(os.path.join(run_dir, "metrics.jsonl")) > 0
    except OSError:
        return False


def _check_run_dirs(run_dir: str):
    """Refuse symlinked checkpoints/, eval/, ... : the lock covers this folder only, so a link would let two
    runs write (and `--overwrite` delete) one checkpoint."""
    for name in RUN_DIRS:
        path = os.path.join(run_dir, name)
        if os.path.islink(path):
            raise UserError(
                f"{path} is a symbolic link; a run writes only into its own folder: make it a real folder, "
                "or point --run_dir at the folder you want the run in"
            )


def claim_run_dir(run_dir: str, resume: str, overwrite: bool) -> bool:
    """Make `run_dir` ready for this run; returns True when a checkpoint there should be resumed.

    Called on the main process only, with the folder's lock held. Refuses (UserError, nothing changed) a
    folder holding a run unless `--resume auto` finds its checkpoint or `--overwrite` replaces it. A run
    stopped while it started up (no checkpoint, no metrics yet) is started again by `--resume auto`, so a
    scheduler can requeue the same command. Files that share a run file's name but no run wrote are never
    replaced, not even with `--overwrite`.
    """
    if resume not in ("", "auto"):
        raise UserError(f"--resume takes 'auto' (continue the run in its folder), got '{resume}'")
    _check_run_dirs(run_dir)
    if resume == "auto" and os.path.isfile(checkpoint_path(run_dir)):
        remove_stale_temp_files(run_dir)
        return True
    if holds_run(run_dir):
        started_up_only = resume == "auto" and not _has_metrics(run_dir)
        if not overwrite and resume == "auto" and not started_up_only:  # trained, but wrote no checkpoint
            raise UserError(
                f"{run_dir} holds a run without a checkpoint (it stopped before writing one): pass --overwrite "
                "to start it again, or another --run_dir"
            )
        if not overwrite and not started_up_only:
            raise UserError(
                f"{run_dir} already holds a run; pass --resume auto to continue it, --overwrite to replace it, "
                "or choose another --exp_name / --run_dir"
            )
        remove_run_files(run_dir)
    else:
        foreign = [name for name in RUN_FILES if os.path.lexists(os.path.join(run_dir, name))]
        if foreign:
            raise UserError(
                f"{run_dir} holds {', '.join(foreign)} that no run wrote; a run would replace them, so move them "
                "or choose another --exp_name / --run_dir"
            )
    remove_stale_temp_files(run_dir)
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    return False


def _unlink(path: str, removed: list[str]):
    """Remove a file (or a symlink, never what it points to) when it is there."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
        removed.append(path)


def _is_eval_result(path: str) -> bool:
    """An eval/<split>.json that eval.py wrote (it names its split, protocol and checkpoint)."""
    return {"split", "protocol", "checkpoint_step"} <= set(_json_object(path) or {})


def _wandb_run_names(run_dir: str) -> re.Pattern | None:
    """The folders wandb names after this run's id (run-<date>_<time>-<id>, offline-run-...)."""
    try:
        with open(os.path.join(run_dir, "wandb_id.txt")) as f:
            run_id = f.read().strip()
    except OSError:
        return None
    return re.compile(rf"(offline-)?run-\d{{8}}_\d{{6}}-{re.escape(run_id)}") if run_id else None


def remove_run_files(run_dir: str) -> list[str]:
    """Remove, by name, the files a run (and eval.py) wrote into `run_dir`; returns the removed paths.

    Top level: RUN_FILES. checkpoints/: latest.pt and the sharded (FSDP) checkpoint folders. tensorboard/:
    SummaryWriter's event files. wandb/: the run folders named after the id in wandb_id.txt and wandb's own
    links. eval/: the results eval.py wrote.
    Stale temporary files of the run's atomic writes go too. A folder is removed only when it is left
    empty; anything else (the user's notes, the lock file) stays where it is.
    """
    removed: list[str] = []
    wandb_runs = _wandb_run_names(run_dir)
    for name in RUN_FILES:
        _unlink(os.path.join(run_dir, name), removed)
    _unlink(checkpoint_path(run_dir), removed)
    removed += remove_sharded_folders(os.path.dirname(checkpoint_path(run_dir)))
    removed += remove_stale_temp_files(run_dir)
    tensorboard = os.path.join(run_dir, "tensorboard")
    for name in _listdir(tensorboard):
        if TENSORBOARD_EVENTS.fullmatch(name):
            _unlink(os.path.join(tensorboard, name), removed)
    wandb = os.path.join(run_dir, "wandb")
    for name in _listdir(wandb):
        path = os.path.join(wandb, name)
        if name in WANDB_LINKS and os.path.islink(path):
            _unlink(path, removed)
        elif wandb_runs and wandb_runs.fullmatch(name) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
            removed.append(path)
    evals = os.path.join(run_dir, "eval")
    for name in _listdir(evals):
        if name.endswith(".json") and _is_eval_result(os.path.join(evals, name)):
            _unlink(os.path.join(evals, name), removed)
    for name in RUN_DIRS:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
            os.rmdir(path)
    return removed


def _listdir(folder: str) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) and not os.path.islink(folder) else []


def _temp_pattern(name: str) -> re.Pattern:
    """The names atomic_io gives the temporary file of a write to `name`: `.<name>.<random>.tmp`."""
    return re.compile(rf"\.{re.escape(name)}\.[A-Za-z0-9_]+\.tmp")


STALE_TEMPS = {  # folder (relative to the run folder) -> names the run writes there atomically
    "": RUN_FILES,
    "checkpoints": (CHECKPOINT_NAME,),
}


def remove_stale_temp_files(run_dir: str) -> list[str]:
    """Remove temporary files that an interrupted atomic write of this run left behind (a SIGKILL mid-write).

    Only names of the form atomic_io gives a write to one of the run's own files are touched; the lock held
    on the folder means no other process of this run is writing them now.
    """
    removed: list[str] = []
    for sub, names in STALE_TEMPS.items():
        folder = os.path.join(run_dir, sub) if sub else run_dir
        patterns = [_temp_pattern(name) for name in names]
        for entry in _listdir(folder):
            path = os.path.join(folder, entry)
            if any(p.fullmatch(entry) for p in patterns) and os.path.isfile(path) and not os.path.islink(path):
                _unlink(path, removed)
    return removed


def check_resume_config(run_dir: str, cfg):
    """A resumed run keeps its model, data and recipe; only RESUMABLE_CHANGES may differ from config.json."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.lexists(path):  # the checkpoint alone cannot say which settings may change
        raise UserError(
            f"{run_dir} has a checkpoint but no config.json, so its settings cannot be checked; restore "
            "config.json, or start the run again with --overwrite"
        )
    saved = read_config_json(path)
    current = config_to_dict(cfg)
    changed = [k for k in current if k in saved and saved[k] != current[k] and k not in RESUMABLE_CHANGES]
    if changed:
        diffs = ", ".join(f"--{k} {saved[k]} (now {current[k]})" for k in changed)
        raise UserError(f"{run_dir} was trained with {diffs}; resume it with the same settings")


# ---- corpus identity -------------------------------------------------------------------------------------

IDENTITY_KEYS = ("tokenizer_sha256", "file_lists_sha256")


def read_corpus(run_dir: str) -> dict | None:
    """The corpus identity recorded in `run_dir/corpus.json`, or None (a run from before it was recorded)."""
    path = os.path.join(run_dir, CORPUS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        raise UserError(f"{path} is unreadable; restore it (it records which corpus the run trained on)") from None
    if not isinstance(data, dict) or not all(k in data for k in IDENTITY_KEYS):
        raise UserError(f"{path} does not hold a corpus identity ({', '.join(IDENTITY_KEYS)})")
    return data


def write_corpus(run_dir: str, dataset: str, identity: dict):
    atomic_write_json(os.path.join(run_dir, CORPUS_FILE), {"dataset": dataset, **identity})


def corpus_differences(recorded: dict, identity: dict) -> list[str]:
    """What differs between two corpus identities, in words (empty when they are the same corpus)."""
    words = {"tokenizer_sha256": "tokenizer", "file_lists_sha256": "file lists (books, order or counts)"}
    return [words[k] for k in IDENTITY_KEYS if recorded.get(k) != identity.get(k)]


def git_revision() -> str:
    """The git commit of the languini source, or 'unknown' outside a checkout; '+dirty' when the checkout
    has changes or untracked files (a new project folder, say): source.zip holds the exact sources."""
    try:
        run = dict(cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=10)
        rev = subprocess.run(["git", "rev-parse", "HEAD"], check=True, **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], **run).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device_name: str, world_size: int, argv: list[str]) -> dict:
    return {
        "git_revision": git_revision(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "device_name": device_name,
        "world_size": world_size,
        "hostname": socket.gethostname(),
        "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(argv),
    }


def command_line(argv: list[str]) -> str:
    """The process's exact command line; the trainer's own arguments too when it was called in-process."""
    cmd = shlex.join(sys.orig_argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        cmd = f"[torchrun worker] {cmd}"
    if list(argv) != sys.argv[1:]:
        cmd += f"  # trainer arguments: {shlex.join(argv)}"
    return cmd


def source_zip() -> bytes:
    """The languini package's Python sources as they ran, zipped in memory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for root, dirs, files in os.walk(PACKAGE_DIR):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
            for name in sorted(files):
                if name.endswith((".py", ".md", ".json", ".sh")):
                    path = os.path.join(root, name)
                    zf.write(path, os.path.relpath(path, os.path.dirname(PACKAGE_DIR)))
    return buf.getvalue()


def write_run_files(run_dir: str, cfg, env: dict, resumed: bool):
    """config.json, env.json, command.txt and source.zip; a resume appends to env.json's `resumes` and to
    command.txt (a damaged env.json is refused: it records where and how the run started)."""
    save_config(cfg, os.path.join(run_dir, "config.json"))
    env_path = os.path.join(run_dir, "env.json")
    command_path = os.path.join(run_dir, "command.txt")
    command = env["command"] + "\n"
    if resumed and os.path.lexists(env_path):
        first = _json_object(env_path)
        if first is None or not isinstance(first.get("resumes", []), list):
            raise UserError(f"{env_path} is damaged (not a run's environment record); restore it to resume this run")
        first.setdefault("resumes", []).append(env)
        env = first
        with contextlib.suppress(FileNotFoundError):
            with open(command_path, encoding="utf-8", errors="replace") as f:
                command = f.read() + command
    atomic_write_json(env_path, env)
    atomic_write_text(command_path, command)
    atomic_write_bytes(os.path.join(run_dir, "source.zip"), source_zip())
