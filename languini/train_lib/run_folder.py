"""The run folder: where a run keeps its config, environment, metrics and checkpoints (docs/training.md).

    runs/<project>/<exp_name>/  config.json env.json command.txt source.zip metrics.jsonl
                                checkpoints/latest.pt  tensorboard/  wandb/

A folder that already holds a run is never reused silently: `--resume auto` continues it, `--overwrite`
replaces it, anything else is a UserError (never an interactive prompt).
"""

import datetime
import io
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import zipfile

import torch

from languini.common_lib.atomic_io import atomic_write_bytes, atomic_write_json, atomic_write_text
from languini.common_lib.config import config_to_dict, save_config
from languini.common_lib.errors import UserError

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT_NAME = "latest.pt"
# What a run writes; `--overwrite` removes exactly these, nothing else the user may have put there.
RUN_FILES = ("config.json", "env.json", "command.txt", "source.zip", "metrics.jsonl", "wandb_id.txt")
RUN_DIRS = ("checkpoints", "tensorboard", "wandb")


# Fields a resumed run may change: they steer logging, evaluation and hardware, not what is trained.
RESUMABLE_CHANGES = {
    "resume", "overwrite", "exp_name", "run_dir", "debug", "data_root", "max_train_steps", "device",
    "precision", "compile", "eval_every", "eval_batch_size", "max_eval_steps", "test_batch_size", "last_n",
    "eval_data_split", "tokens_per_second", "log_terminal_every", "log_metrics_every", "log_grads_every",
    "log_ckpt_every", "logger_type", "wandb_project_name", "progress_bar",
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


def holds_run(run_dir: str) -> bool:
    return any(
        os.path.exists(os.path.join(run_dir, name))
        for name in ("config.json", "metrics.jsonl", "checkpoints")
    )


def claim_run_dir(run_dir: str, resume: str, overwrite: bool) -> bool:
    """Make `run_dir` ready for this run; returns True when a checkpoint there should be resumed.

    Called on the main process only.
    """
    if resume not in ("", "auto"):
        raise UserError(f"--resume takes 'auto' (continue the run in its folder), got '{resume}'")
    if resume == "auto" and os.path.isfile(checkpoint_path(run_dir)):
        return True
    if holds_run(run_dir):
        if resume == "auto":  # killed before its first checkpoint: nothing to continue from
            print(f"--resume auto: no checkpoint in {run_dir}, starting the run again")
        elif not overwrite:
            raise UserError(
                f"{run_dir} already holds a run; pass --resume auto to continue it, --overwrite to replace it, "
                "or choose another --exp_name / --run_dir"
            )
        for name in RUN_FILES:
            if os.path.isfile(os.path.join(run_dir, name)):
                os.unlink(os.path.join(run_dir, name))
        for name in RUN_DIRS:
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    return False


def check_resume_config(run_dir: str, cfg):
    """A resumed run keeps its model, data and recipe; only RESUMABLE_CHANGES may differ from config.json."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = json.load(f)
    current = config_to_dict(cfg)
    changed = [k for k in current if k in saved and saved[k] != current[k] and k not in RESUMABLE_CHANGES]
    if changed:
        diffs = ", ".join(f"--{k} {saved[k]} (now {current[k]})" for k in changed)
        raise UserError(f"{run_dir} was trained with {diffs}; resume it with the same settings")


def git_revision() -> str:
    """The git commit of the languini source ('+dirty' when modified), or 'unknown' outside a checkout."""
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
    """config.json, env.json, command.txt and source.zip; a resume appends to env.json's `resumes`."""
    save_config(cfg, os.path.join(run_dir, "config.json"))
    env_path = os.path.join(run_dir, "env.json")
    command = env["command"] + "\n"
    if resumed and os.path.isfile(env_path):
        with open(env_path) as f:
            first = json.load(f)
        first.setdefault("resumes", []).append(env)
        env = first
        with open(os.path.join(run_dir, "command.txt")) as f:
            command = f.read() + command
    atomic_write_json(env_path, env)
    atomic_write_text(os.path.join(run_dir, "command.txt"), command)
    atomic_write_bytes(os.path.join(run_dir, "source.zip"), source_zip())
