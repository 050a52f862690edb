"""Metric sinks. `metrics.jsonl` in the run folder is the ground truth; tensorboard and wandb are optional.

Every record carries the original's three x-axes: `step` (completed optimiser steps), `tokens` (tokens
trained on) and, when the config gives the reference-GPU throughput `tokens_per_second`, `ref_gpu_hours`
(the accelerator hours of the reference GPU that `tokens` correspond to). `time` is wall seconds of training.
"""

import importlib.util
import json
import os
import uuid

from languini.common_lib.atomic_io import atomic_write_text
from languini.common_lib.errors import UserError

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str) -> list[dict]:
    """The records of a run's metrics.jsonl (a torn last line from a crash, or a line that is not a record,
    is skipped)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step", 0), (int, float)):
                records.append(record)  # anything else is not a line the logger wrote
    return records


def truncate_metrics(run_dir: str, last_step: int):
    """Drop records after `last_step` (written by a run that died after its last checkpoint)."""
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
    atomic_write_text(os.path.join(run_dir, METRICS_FILE), "".join(json.dumps(r) + "\n" for r in kept))


def check_sinks(logger_type: str):
    """Fail before any run files are written when a requested sink is not installed."""
    needed = {"tb": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}.get(logger_type, [])
    for package in needed:
        if importlib.util.find_spec(package) is None:
            raise UserError(
                f"--logger_type {logger_type} needs {package}: pip install {package} (or use --logger_type none)"
            )


class TensorboardSink:
    """One scalar per metric against steps, plus `by_tokens/` and `by_ref_gpu_seconds/` copies."""

    def __init__(self, run_dir: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events a crashed run wrote after the checkpoint we resume from
        self.writer = SummaryWriter(
            os.path.join(run_dir, "tensorboard"), purge_step=start_step + 1 if start_step else None
        )

    def log(self, axes: dict, metrics: dict):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, axes["step"])
            self.writer.add_scalar(f"by_tokens/{key}", value, axes["tokens"])
            if "ref_gpu_hours" in axes:
                self.writer.add_scalar(
                    f"by_ref_gpu_seconds/{key}", value, round(axes["ref_gpu_hours"] * 3600)
                )
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbSink:
    """wandb run resumed by a stable id kept in the run folder; WANDB_MODE=offline works without network."""

    def __init__(self, run_dir: str, cfg, config_dict: dict):
        import wandb  # presence checked by check_sinks

        id_path = os.path.join(run_dir, "wandb_id.txt")
        if os.path.isfile(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            atomic_write_text(id_path, run_id)
        self.run = wandb.init(
            project=cfg.wandb_project_name,
            name=os.path.basename(os.path.normpath(run_dir)),
            id=run_id,
            resume="allow",
            dir=run_dir,
            config=config_dict,
        )
        for axis in ("tokens", "ref_gpu_hours"):
            self.run.define_metric(axis)

    def log(self, axes: dict, metrics: dict):
        self.run.log({**metrics, **axes})

    def close(self):
        self.run.finish()


class MetricsLogger:
    """Writes records to metrics.jsonl and the chosen sinks; a no-op on processes other than rank 0."""

    def __init__(self, run_dir: str, cfg, config_dict: dict, enabled: bool, start_step: int):
        self.enabled = enabled
        self.tokens_per_step = cfg.train_batch_size * cfg.seq_len
        self.ref_tokens_per_second = cfg.tokens_per_second
        self.sinks = []
        self.file = None
        if not enabled:
            return
        self.file = open(os.path.join(run_dir, METRICS_FILE), "a")
        if cfg.logger_type in ("tb", "all"):
            self.sinks.append(TensorboardSink(run_dir, start_step))
        if cfg.logger_type in ("wandb", "all"):
            self.sinks.append(WandbSink(run_dir, cfg, config_dict))

    def axes(self, step: int, elapsed: float) -> dict:
        tokens = step * self.tokens_per_step
        axes = {"step": step, "tokens": tokens, "time": round(elapsed, 3)}
        if self.ref_tokens_per_second > 0:
            axes["ref_gpu_hours"] = tokens / self.ref_tokens_per_second / 3600
        return axes

    def log(self, step: int, elapsed: float, metrics: dict):
        if not self.enabled:
            return
        axes = self.axes(step, elapsed)
        self.file.write(json.dumps({**axes, **metrics}) + "\n")
        self.file.flush()
        for sink in self.sinks:
            sink.log(axes, metrics)

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []
