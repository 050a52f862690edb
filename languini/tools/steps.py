"""`languini steps PROJECT [PRESET] --train_batch_size B [--hours H | --flops F]`: a compute class in steps.

The throughput comes from the published RTX 3090 table, `--tokens_per_second`, a `throughput.py --json`
file, or `--calibrate` (measured here against a reference preset); see docs/compute_classes.md.
"""

import dataclasses
import json
import math
import os
import shlex
import sys

from languini.common_lib.config import config_flags
from languini.common_lib.errors import UserError, exit_on_user_error
from languini.projects import load_project
from languini.tools.compute_classes import (
    COMPUTE_CLASS_HOURS,
    REFERENCE_TOKENS_PER_SECOND,
    modified_model_fields,
    published_recipe,
    recipe_command,
    reference_tokens_per_second,
    steps_for,
    steps_for_flops,
)
from languini.tools.flops import count_step_flops
from languini.tools.throughput import check_timing_options, measure
from languini.tools.tool_args import parse_tool_args

STEPS_FLAGS = {
    "hours": (float, None, "compute class in reference-GPU hours (default: print every class)"),
    "tokens_per_second": (float, None, "reference-GPU throughput of the config (default: the published table)"),
    "throughput_json": (str, "", "take tokens_per_second from a `throughput.py --json` file"),
    "flops": (float, None, "a FLOP budget instead of hours (hardware-independent class), e.g. 1e18"),
    "calibrate": (bool, False, "estimate the 3090 throughput from a local measurement against a reference preset"),
    "reference_preset": (str, "", "reference preset for --calibrate (default: the config's preset or small)"),
    "steps": (int, 0, "timed steps per --calibrate measurement (0 = auto)"),
    "warmup": (int, -1, "warm-up steps per --calibrate measurement (-1 = auto)"),
}


def _throughput_from_json(path: str, project: str, cfg) -> float:
    """tokens/s of a `throughput.py --json` file, which must describe this project, preset and seq_len."""
    if not os.path.isfile(path):
        raise UserError(f"no throughput JSON at {path}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as a throughput JSON: {e}") from None
    if not isinstance(data, dict) or not data.get("tokens_per_second"):
        raise UserError(f"{path} holds no tokens_per_second (was it written by throughput.py --json?)")
    wanted = {"project": project, "preset": cfg.preset, "seq_len": cfg.seq_len}
    differ = [f"{k} {data[k]} (not {v})" for k, v in wanted.items() if k in data and data[k] != v]
    if differ:
        raise UserError(f"{path} measured another config: {', '.join(differ)}")
    return float(data["tokens_per_second"])


def calibrate(project: str, cfg, reference_preset: str, steps: int, warmup: int) -> tuple[float, str]:
    """Estimate the config's RTX 3090 throughput: measure it and a reference preset here, scale the
    reference's published 3090 figure by the ratio. Returns (tokens/s, the assumption in words)."""
    ref_tps = reference_tokens_per_second(project, reference_preset)
    if ref_tps is None:
        valid = ", ".join(REFERENCE_TOKENS_PER_SECOND.get(project, {})) or "none"
        raise UserError(f"--reference_preset {reference_preset} has no published 3090 throughput; valid: {valid}")
    ref_cfg = load_project(project).preset_config(reference_preset)
    run_fields = ("train_batch_size", "gradient_accumulation_steps", "device", "precision", "compile", "seed")
    ref_cfg = dataclasses.replace(ref_cfg, **{name: getattr(cfg, name) for name in run_fields})
    mine = measure(project, cfg, steps=steps, warmup=warmup)
    ref = measure(project, ref_cfg, steps=steps, warmup=warmup)
    ratio = mine["tokens_per_second"] / ref["tokens_per_second"]
    assumption = (
        f"measured on {mine['device']}: this config {mine['tokens_per_second']:,.0f} tokens/s, {project} "
        f"{reference_preset} {ref['tokens_per_second']:,.0f} tokens/s (ratio {ratio:.3f}); assumes the ratio is "
        f"the same on an RTX 3090, whose {reference_preset} figure is {ref_tps:,} tokens/s. The ratio can "
        f"differ across GPUs (memory bandwidth vs compute, kernels, memory limits): confirm on a 3090 if you can"
    )
    return ref_tps * ratio, assumption


def _resolve_throughput(project: str, cfg, opts) -> tuple[float, str]:
    """tokens/s and where it came from: --tokens_per_second, --throughput_json, --calibrate, or the table."""
    if opts.tokens_per_second is not None:
        return opts.tokens_per_second, "given by --tokens_per_second"
    if opts.throughput_json:
        return _throughput_from_json(opts.throughput_json, project, cfg), f"read from {opts.throughput_json}"
    if opts.calibrate:
        reference = opts.reference_preset or (
            cfg.preset if reference_tokens_per_second(project, cfg.preset) else "small"
        )
        return calibrate(project, cfg, reference, opts.steps, opts.warmup)
    published = reference_tokens_per_second(project, cfg.preset)
    if published is None:
        raise UserError(
            f"no published RTX 3090 throughput for {project} {cfg.preset}; "
            "pass --tokens_per_second, --throughput_json FILE or --calibrate"
        )
    changed = modified_model_fields(project, cfg)
    if changed:
        raise UserError(
            f"the published throughput of {project} {cfg.preset} does not describe a config with modified "
            f"{', '.join(changed)}; measure it (--calibrate, --throughput_json) or pass --tokens_per_second"
        )
    return float(published), f"published RTX 3090 figure for {project} {cfg.preset}"


def _check_options(opts):
    """One line for a budget or throughput that is not a finite positive number, or for two budgets."""
    for name in ("hours", "flops", "tokens_per_second"):
        value = opts[name]
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"--{name} must be a finite number > 0, got {value}")
    if opts.hours is not None and opts.flops is not None:
        raise UserError("pass --hours or --flops, not both (a compute class is one budget)")
    check_timing_options(opts)


def _config_flags(project: str, cfg) -> str:
    """The config flags given beside the preset (`--train_batch_size 8 ...`): the printed steps hold for
    this config only, so the suggested command repeats them."""
    preset = load_project(project).preset_config(cfg.preset)
    flags = config_flags(cfg, preset, skip=("max_train_steps", "decay_steps"))
    return " " + shlex.join(flags) if flags else ""


@exit_on_user_error
def main(argv=None):
    usage = "languini steps PROJECT [PRESET] --train_batch_size B [--hours H | --flops F] [--flags]"
    project, cfg, opts = parse_tool_args(sys.argv[1:] if argv is None else argv, usage, STEPS_FLAGS)
    _check_options(opts)
    tokens_per_step = cfg.train_batch_size * cfg.seq_len
    print(f"{project} {cfg.preset}: train_batch_size {cfg.train_batch_size} x seq_len {cfg.seq_len} "
          f"= {tokens_per_step:,} tokens per step")  # fmt: skip
    same_config = _config_flags(project, cfg)
    if opts.flops is not None:
        per_token = count_step_flops(project, cfg).forward_backward_per_token
        steps = steps_for_flops(opts.flops, per_token, cfg.train_batch_size, cfg.seq_len)
        print(f"FLOPs per token (fwd+bwd, torch.utils.flop_counter): {per_token:.4g}")
        print(f"{opts.flops:.4g} FLOPs -> {steps} steps")
        print(f"--max_train_steps {steps} --decay_steps {steps}{same_config}")
        return 0
    tps, source = _resolve_throughput(project, cfg, opts)
    print(f"tokens_per_second {tps:,.0f} ({source})")
    hours = [opts.hours] if opts.hours is not None else COMPUTE_CLASS_HOURS
    for h in hours:
        steps = steps_for(h, tps, cfg.train_batch_size, cfg.seq_len)
        print(f"{h:g}h: {steps} steps   --max_train_steps {steps} --decay_steps {steps} --tokens_per_second {tps:.0f}"
              f"{same_config}")  # fmt: skip
        recipe = published_recipe(project, cfg, h)
        if recipe and recipe["steps"] == steps:
            print(f"this is the published {h:g}h recipe:\n{recipe_command(recipe)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
