"""Read run folders (config.json, metrics.jsonl, env.json, eval/<split>.json) for reports and plots.

A bundle (`languini export`) is read like a run folder once it passes verification; one that fails it is
refused in one line. A result scored on another corpus than the run's (`other_corpus`, e.g.
eval/<split>@<dataset>.json) is not the run's result: it is left out with a warning.

Runs may still be training, may have crashed, or may come from an older version: a missing or partly
written file gives a warning on the run, never an exception, so a report over many runs always comes out.
A metrics line whose numbers are not finite numbers (a string, `1e400`, NaN) is skipped with a warning; a
number of a config or eval file that is not one is dropped with a warning.
"""

import glob
import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from languini.common_lib.config import apply_overrides
from languini.common_lib.errors import UserError
from languini.projects import load_project
from languini.tools.export import check_bundle
from languini.tools.flops import build_model, count_step_flops, param_counts
from languini.train_lib.bundle import is_bundle

RUN_MARKERS = ("config.json", "metrics.jsonl")
GIT_KEYS = ("git_revision", "git_rev", "git_commit", "git", "revision", "commit")
AXIS_KEYS = {"step", "tokens", "time", "ref_gpu_hours"}
PARAM_KEYS = ("n_params", "num_params", "params", "parameters")
# Numbers the report computes with: a config or eval value that is not a finite number is dropped.
CONFIG_NUMBERS = ("max_train_steps", "train_batch_size", "seq_len", "vocab_size", "tokens_per_second")
EVAL_NUMBERS = ("loss", "ppl", "normalised_loss", "normalised_ppl", "bits_per_byte", "top1", "top10", "n_tokens",
                "n_chars", "n_bytes", "last_n", "checkpoint_step")  # fmt: skip


EVAL_SETTING_DEFAULTS = {"eval_streams": 1, "max_tokens": 0}  # what an eval JSON without the key used


def eval_setting(result: dict) -> tuple:
    """How a split was scored: (protocol, last_n, eval_streams, max_tokens). Results written before
    streams and caps existed scored the whole split as one stream."""
    return (
        result.get("protocol"),
        result.get("last_n"),
        result.get("eval_streams", EVAL_SETTING_DEFAULTS["eval_streams"]),
        result.get("max_tokens", EVAL_SETTING_DEFAULTS["max_tokens"]),
    )


def setting_label(setting: tuple) -> str:
    """A short readable name of an eval setting, e.g. `sliding_window last_n 128` or `stateful 8 streams,
    first 1e+06 tokens`."""
    protocol, last_n, streams, max_tokens = setting
    parts = [str(protocol)]
    if last_n is not None:
        parts.append(f"last_n {last_n}")
    if streams not in (None, 1):
        parts.append(f"{streams} streams")
    text = " ".join(parts)
    return text + (f", first {max_tokens:,} tokens" if max_tokens else "")


def is_number(value) -> bool:
    """A finite int or float (JSON's 1e400 parses to inf, and a bool is not a number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _drop_bad_numbers(data: dict, keys, what: str, warnings: list[str], name: str) -> dict:
    bad = [k for k in keys if data.get(k) is not None and not is_number(data[k])]
    for key in bad:
        warnings.append(f"{name}: {what}: '{key}' is {str(data[key])[:40]!r}, not a finite number; ignored")
    return {k: v for k, v in data.items() if k not in bad}


def _bad_value(record: dict) -> str | None:
    """The first key of a metrics record whose value is not a finite number (axes must be present numbers)."""
    for key, value in record.items():
        if value is None and key not in AXIS_KEYS:
            continue
        if not is_number(value):
            return key
    return None


@dataclass
class Run:
    """One run folder, as read from disk. `warnings` lists what was missing or unreadable."""

    path: str
    name: str
    config: dict
    metrics: list[dict]
    env: dict
    evals: dict[str, dict]
    warnings: list[str] = field(default_factory=list)

    @property
    def project(self) -> str:
        return str(self.config.get("project") or "?")

    @property
    def model(self) -> str:
        """The project, plus the optimiser when it is not the default Adam ("gpt + muon"): runs that differ
        in optimiser are different series of the scaling plot."""
        optimizer = self.config.get("optimizer") or "adam"
        return self.project if optimizer == "adam" else f"{self.project} + {optimizer}"

    @property
    def preset(self) -> str:
        return str(self.config.get("preset") or "?")

    @property
    def dataset(self) -> str | None:
        """The config's dataset name; a value that is not a string (a damaged or crafted config) as text."""
        value = self.config.get("dataset")
        return None if value is None else str(value)

    @property
    def vocab_size(self) -> int | None:
        return self.config.get("vocab_size")

    @property
    def tokens_per_second(self) -> float:
        """Reference-GPU throughput of the config; 0 when it was not measured."""
        return float(self.config.get("tokens_per_second") or 0.0)

    @property
    def steps(self) -> int:
        """Optimiser steps completed, as far as metrics.jsonl tells."""
        return max((int(r["step"]) for r in self.metrics if "step" in r), default=0)

    @property
    def tokens(self) -> int:
        """Training tokens seen; estimated from steps when the log lacks a `tokens` column."""
        logged = [int(r["tokens"]) for r in self.metrics if "tokens" in r]
        if logged:
            return max(logged)
        return self.steps * int(self.config.get("train_batch_size", 0)) * int(self.config.get("seq_len", 0))

    @property
    def ref_gpu_hours(self) -> float | None:
        """Reference-GPU hours of the tokens seen (the compute class); None without a throughput."""
        return hours_from_tokens(self.tokens, self.tokens_per_second)

    @property
    def planned_steps(self) -> int | None:
        return self.config.get("max_train_steps")

    @property
    def git_revision(self) -> str:
        return git_revision(self.env)

    @cached_property
    def n_params(self) -> int | None:
        """Trainable parameters: from env.json/config when recorded, else counted on the meta device."""
        for source in (self.env, self.config):
            for key in PARAM_KEYS:
                if isinstance(source.get(key), int):
                    return source[key]
        try:
            return count_params(self.config)
        except Exception as e:  # an unknown or changed project must not stop the report
            self.warnings.append(f"{self.name}: could not count parameters ({type(e).__name__}: {e})")
            return None

    @cached_property
    def flops_per_token(self) -> float | None:
        """Training FLOPs per token of the config: forward + backward of one step (`count_step_flops`,
        matrix products only, attention over the full T x T matrix) divided by its tokens."""
        try:
            return count_flops_per_token(self.config)
        except Exception as e:  # an unknown or changed project must not stop the report
            self.warnings.append(f"{self.name}: could not count FLOPs ({type(e).__name__}: {e})")
            return None

    @property
    def training_flops(self) -> float | None:
        """FLOPs per token x tokens seen (None when the FLOPs cannot be counted)."""
        fpt = self.flops_per_token
        return None if fpt is None else fpt * self.tokens

    def series(self, key: str, x: str = "tokens") -> tuple[np.ndarray, np.ndarray]:
        """(x values, metric values) of every record holding `key`; x is step, tokens, flops or
        ref_gpu_hours. One value per x: when a step was logged twice, the later record counts."""
        by_x: dict[float, float] = {}
        for r in self.metrics:
            if key not in r or r[key] is None:
                continue
            xv = self._x_of(r, x)
            if xv is not None:
                by_x.pop(xv, None)
                by_x[xv] = float(r[key])
        return np.asarray(list(by_x), dtype=np.float64), np.asarray(list(by_x.values()), dtype=np.float64)

    def _x_of(self, record: dict, x: str) -> float | None:
        if x == "flops":
            fpt, tokens = self.flops_per_token, record.get("tokens")
            return None if fpt is None or tokens is None else float(tokens) * fpt
        if x == "ref_gpu_hours":
            if record.get("ref_gpu_hours") is not None:
                return float(record["ref_gpu_hours"])
            return hours_from_tokens(record.get("tokens"), self.tokens_per_second)
        value = record.get(x)
        return None if value is None else float(value)


def hours_from_tokens(tokens, tokens_per_second: float) -> float | None:
    """Reference-GPU hours = tokens / reference tokens-per-second / 3600 (None without a throughput)."""
    if tokens is None or not tokens_per_second or tokens_per_second <= 0:
        return None
    return float(tokens) / tokens_per_second / 3600.0


def git_revision(env: dict) -> str:
    """The git revision recorded in env.json (short hash, `+dirty` when the tree had changes), or '?'."""
    value = next((env[k] for k in GIT_KEYS if env.get(k)), None)
    dirty = bool(env.get("git_dirty"))
    if isinstance(value, dict):
        dirty = dirty or bool(value.get("dirty"))
        value = value.get("revision") or value.get("commit") or value.get("sha")
    if not value:
        return "?"
    match = re.fullmatch(r"([0-9a-f]{7,40})([+-]dirty)?", str(value))
    if not match:
        return str(value)
    return match.group(1)[:10] + ("+dirty" if dirty or match.group(2) else "")


def count_params(config: dict) -> int:
    """Build the project's model on the meta device (no memory) and count its parameters."""
    project = config.get("project")
    cfg_cls = load_project(project).Config
    known = {k: v for k, v in config.items() if k in cfg_cls.__dataclass_fields__}
    cfg = apply_overrides(cfg_cls(), known)
    return param_counts(build_model(project, cfg, "meta"), cfg.vocab_size)[0]


_FLOPS_CACHE: dict[str, float] = {}


def count_flops_per_token(config: dict) -> float:
    """Forward + backward FLOPs per token of the run's model and sequence length (counted once per config)."""
    project = config.get("project")
    cfg_cls = load_project(project).Config
    known = {k: v for k, v in config.items() if k in cfg_cls.__dataclass_fields__}
    key = json.dumps([project, known], sort_keys=True, default=str)
    if key not in _FLOPS_CACHE:
        cfg = apply_overrides(cfg_cls(), known)
        _FLOPS_CACHE[key] = count_step_flops(project, cfg, batch_size=1).forward_backward_per_token
    return _FLOPS_CACHE[key]


def _read_json(path: str, what: str, warnings: list[str], name: str) -> dict:
    if not os.path.isfile(path):
        warnings.append(f"{name}: no {what}")
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        warnings.append(f"{name}: {what} is unreadable ({e}); ignored")
        return {}
    if not isinstance(data, dict):
        warnings.append(f"{name}: {what} does not hold a JSON object; ignored")
        return {}
    return data


def read_metrics(path: str, name: str, warnings: list[str]) -> list[dict]:
    """Parse metrics.jsonl. Bad lines are skipped with a warning; after a resume, records of steps that
    were logged again replace the earlier ones, so the curve is the one the final model followed."""
    if not os.path.isfile(path):
        warnings.append(f"{name}: no metrics.jsonl")
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    lines = text.split("\n")
    records: list[dict] = []
    logged: dict[float, set[str]] = {}  # step -> metric names logged at that step
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            last = i == len(lines) - 1
            what = (
                "its last line is incomplete (still writing or crashed?)"
                if last
                else f"line {i + 1} is not JSON"
            )
            warnings.append(f"{name}: metrics.jsonl: {what}; skipped")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            continue
        bad = _bad_value(record)
        if bad is not None:
            shown = str(record[bad])[:40]
            warnings.append(f"{name}: metrics.jsonl line {i + 1}: '{bad}' is {shown!r}, not a finite number; skipped")
            continue
        step, keys = record["step"], set(record) - AXIS_KEYS
        replayed = records and (step < records[-1]["step"] or keys & logged.get(step, set()))
        if replayed:  # a resumed run logs again from its checkpoint: forget what came after it
            records = [r for r in records if r["step"] < step]
            logged = {s: k for s, k in logged.items() if s < step}
        logged.setdefault(step, set()).update(keys)
        records.append(record)
    return records


def read_evals(run_dir: str, name: str, warnings: list[str]) -> dict[str, dict]:
    """Every eval/<split>.json of the run, keyed by split name; results on another corpus are left out."""
    evals = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "eval", "*.json"))):
        what = f"eval/{os.path.basename(path)}"
        data = _drop_bad_numbers(_read_json(path, what, warnings, name), EVAL_NUMBERS, what, warnings, name)
        if data.get("other_corpus"):
            warnings.append(f"{name}: {what} scored the run on another corpus than it trained on; not reported")
        elif data:
            evals[str(data.get("split") or os.path.splitext(os.path.basename(path))[0])] = data
    return evals


def load_run(run_dir: str, name: str | None = None) -> Run:
    """Read one run folder; missing or damaged files become warnings on the returned run."""
    if not os.path.isdir(run_dir):
        raise UserError(f"no run folder at {run_dir}")
    if is_bundle(run_dir):
        check_bundle(run_dir)
    name = name or os.path.basename(os.path.normpath(run_dir))
    warnings: list[str] = []
    config = _read_json(os.path.join(run_dir, "config.json"), "config.json", warnings, name)
    config = _drop_bad_numbers(config, CONFIG_NUMBERS, "config.json", warnings, name)
    metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"), name, warnings)
    env = _read_json(os.path.join(run_dir, "env.json"), "env.json", warnings, name)
    evals = read_evals(run_dir, name, warnings)
    if not evals:
        warnings.append(
            f"{name}: no evaluation results (run `languini eval {config.get('project', 'PROJECT')} "
            f"--run_dir {run_dir}`)"
        )
    return Run(run_dir, name, config, metrics, env, evals, warnings)


def is_run_dir(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, marker)) for marker in RUN_MARKERS)


def find_run_dirs(paths: list[str]) -> list[str]:
    """Run folders among `paths`; a folder that is not a run is searched for runs below it."""
    found = []
    for path in paths:
        if not os.path.isdir(path):
            raise UserError(f"no run folder at {path}")
        if is_run_dir(path):
            found.append(path)
            continue
        below = []
        for root, dirs, _ in os.walk(path):
            dirs.sort()
            if is_run_dir(root):
                below.append(root)
                dirs.clear()  # a run's own subfolders (eval/, checkpoints/) hold no runs
        if not below:
            raise UserError(f"{path} holds no run (a run folder has config.json or metrics.jsonl)")
        found += below
    return list(dict.fromkeys(os.path.normpath(p) for p in found))


def run_names(run_dirs: list[str]) -> list[str]:
    """Short unique names: the folder name, or the path below the common parent when names repeat."""
    names = [os.path.basename(p) for p in run_dirs]
    if len(set(names)) == len(names):
        return names
    parent = os.path.commonpath([os.path.abspath(p) for p in run_dirs])
    return [os.path.relpath(os.path.abspath(p), parent) for p in run_dirs]


def load_runs(paths: list[str]) -> list[Run]:
    """Find and read every run under `paths`."""
    run_dirs = find_run_dirs(paths)
    return [load_run(p, n) for p, n in zip(run_dirs, run_names(run_dirs))]
