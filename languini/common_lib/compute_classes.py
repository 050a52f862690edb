"""Compute classes: reference-GPU hours turned into training steps (DESIGN §7), and `languini steps`.

A compute class is a budget of accelerator hours on the reference GPU, an NVIDIA RTX 3090. A config that
processes `tokens_per_second` tokens on that GPU trains for

    steps = round(hours * 3600 * tokens_per_second / (train_batch_size * seq_len)).

The reference throughputs below are the original paper's measurements at each preset's best batch size.
"""

import dataclasses
import json
import os
import sys

from languini.common_lib.config import build_preset
from languini.common_lib.errors import UserError, exit_on_user_error
from languini.common_lib.flops import count_step_flops
from languini.common_lib.projects import import_project_module
from languini.train_lib.train_config import TrainConfig

REFERENCE_GPU = "NVIDIA GeForce RTX 3090"
COMPUTE_CLASS_HOURS = (6, 12, 24, 48, 96)
THROUGHPUT_CLASS_HOURS = (3, 6, 12, 24, 48, 96)  # what the throughput tool prints (3 h is a quick class)

# project -> preset -> tokens/s on an RTX 3090 (bf16/fp16, compiled, best batch size, seq_len 512).
# The quasi-LSTM figures were measured on its 3-projection variant.
REFERENCE_TOKENS_PER_SECOND = {
    "gpt": {"mini": 238_719, "tiny": 141_864, "small": 55_416, "medium": 16_618, "large": 7_058},
    "lstm": {"mini": 94_781, "tiny": 36_930, "small": 11_143},
}

# The best published configs per compute class; steps follow from the reference table above.
RECIPES = [
    dict(project="gpt", hours=6, preset="small", train_batch_size=128, gradient_accumulation_steps=4, steps=18265),
    dict(project="gpt", hours=12, preset="small", train_batch_size=128, gradient_accumulation_steps=4, steps=36529),
    dict(project="gpt", hours=24, preset="small", train_batch_size=256, gradient_accumulation_steps=8, steps=36529),
    dict(project="gpt", hours=48, preset="medium", train_batch_size=256, gradient_accumulation_steps=32, steps=21908),
    dict(project="gpt", hours=96, preset="medium", train_batch_size=256, gradient_accumulation_steps=32, steps=43817),
    dict(project="lstm", hours=6, preset="mini", train_batch_size=80, gradient_accumulation_steps=1, steps=49982),
    dict(project="lstm", hours=12, preset="tiny", train_batch_size=80, gradient_accumulation_steps=2, steps=38950),
    dict(project="lstm", hours=24, preset="small", train_batch_size=84, gradient_accumulation_steps=6, steps=22385),
    dict(project="lstm", hours=48, preset="small", train_batch_size=80, gradient_accumulation_steps=5, steps=47010),
    dict(project="lstm", hours=96, preset="small", train_batch_size=160, gradient_accumulation_steps=10, steps=47010),
]  # fmt: skip


def steps_for(hours: float, tokens_per_second: float, train_batch_size: int, seq_len: int) -> int:
    """Optimiser steps that fill `hours` on a GPU processing `tokens_per_second`."""
    if hours <= 0 or tokens_per_second <= 0 or train_batch_size <= 0 or seq_len <= 0:
        raise UserError("hours, tokens_per_second, train_batch_size and seq_len must all be positive")
    return round(hours * 3600 * tokens_per_second / (train_batch_size * seq_len))


def steps_for_flops(flops: float, flops_per_token: float, train_batch_size: int, seq_len: int) -> int:
    """Optimiser steps that spend a FLOP budget (a hardware-independent compute class)."""
    if flops <= 0 or flops_per_token <= 0:
        raise UserError("--flops and the config's FLOPs per token must be positive")
    return round(flops / (flops_per_token * train_batch_size * seq_len))


def reference_tokens_per_second(project: str, preset: str) -> float | None:
    return REFERENCE_TOKENS_PER_SECOND.get(project, {}).get(preset)


def recipe_command(recipe: dict) -> str:
    """The training command that reproduces a published recipe (steps = decay steps)."""
    tps = reference_tokens_per_second(recipe["project"], recipe["preset"])
    return (
        f"torchrun --standalone languini/projects/{recipe['project']}/main.py {recipe['preset']} \\\n"
        f"  --train_batch_size {recipe['train_batch_size']} "
        f"--gradient_accumulation_steps {recipe['gradient_accumulation_steps']} \\\n"
        f"  --max_train_steps {recipe['steps']} --decay_steps {recipe['steps']} --tokens_per_second {tps}"
    )


def published_recipe(project: str, cfg, hours: float) -> dict | None:
    """The published recipe for this project, preset, class and batch size, if there is one."""
    for r in RECIPES:
        if (r["project"], r["preset"], r["hours"], r["train_batch_size"]) == (project, cfg.preset, hours, cfg.train_batch_size):
            return r
    return None


# Fields whose values the published figure covers either way: the qLSTM figures were measured on the coupled
# (3-projection) variant and the paper's recipes trained the 4-projection model with them.
SAME_PUBLISHED_THROUGHPUT = {"lstm": {"coupled"}}


def modified_model_fields(project: str, cfg) -> list[str]:
    """Config fields (outside the shared training fields, plus seq_len) that differ from the preset's,
    i.e. the reasons a preset's published throughput would not describe this config."""
    configs = import_project_module(project, "configs")
    preset = build_preset(configs.Config, configs.PRESETS, cfg.preset)
    shared = {f.name for f in dataclasses.fields(TrainConfig)} - {"seq_len", "vocab_size"}
    shared |= SAME_PUBLISHED_THROUGHPUT.get(project, set())
    return [
        f.name for f in dataclasses.fields(cfg) if f.name not in shared and getattr(cfg, f.name) != getattr(preset, f.name)
    ]


# ---------------------------------------------------------------------------------------------------
# `languini steps PROJECT PRESET --hours H --train_batch_size B`

STEPS_FLAGS = {
    "hours": (float, 0.0, "compute class in reference-GPU hours (default: print every class)"),
    "tokens_per_second": (float, 0.0, "reference-GPU throughput of the config (default: the published table)"),
    "throughput_json": (str, "", "take tokens_per_second from a `throughput.py --json` file"),
    "flops": (float, 0.0, "a FLOP budget instead of hours (hardware-independent class), e.g. 1e18"),
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
    from languini.common_lib.throughput import measure  # throughput imports this module: import late

    ref_tps = reference_tokens_per_second(project, reference_preset)
    if ref_tps is None:
        valid = ", ".join(REFERENCE_TOKENS_PER_SECOND.get(project, {})) or "none"
        raise UserError(f"--reference_preset {reference_preset} has no published 3090 throughput; valid: {valid}")
    configs = import_project_module(project, "configs")
    ref_cfg = build_preset(configs.Config, configs.PRESETS, reference_preset)
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
    if opts.tokens_per_second > 0:
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


@exit_on_user_error
def main(argv=None):
    from languini.common_lib.throughput import parse_tool_args  # throughput imports this module

    usage = "languini steps PROJECT [PRESET] --train_batch_size B [--hours H | --flops F] [--flags]"
    project, cfg, opts = parse_tool_args(sys.argv[1:] if argv is None else argv, usage, STEPS_FLAGS)
    if opts.hours < 0 or opts.flops < 0:
        raise UserError("--hours and --flops must be positive")
    tokens_per_step = cfg.train_batch_size * cfg.seq_len
    print(f"{project} {cfg.preset}: train_batch_size {cfg.train_batch_size} x seq_len {cfg.seq_len} "
          f"= {tokens_per_step:,} tokens per step")  # fmt: skip
    if opts.flops > 0:
        per_token = count_step_flops(project, cfg).forward_backward_per_token
        steps = steps_for_flops(opts.flops, per_token, cfg.train_batch_size, cfg.seq_len)
        print(f"FLOPs per token (fwd+bwd, torch.utils.flop_counter): {per_token:.4g}")
        print(f"{opts.flops:.4g} FLOPs -> {steps} steps")
        print(f"--max_train_steps {steps} --decay_steps {steps}")
        return 0
    tps, source = _resolve_throughput(project, cfg, opts)
    print(f"tokens_per_second {tps:,.0f} ({source})")
    hours = [opts.hours] if opts.hours > 0 else COMPUTE_CLASS_HOURS
    for h in hours:
        steps = steps_for(h, tps, cfg.train_batch_size, cfg.seq_len)
        print(f"{h:g}h: {steps} steps   --max_train_steps {steps} --decay_steps {steps} --tokens_per_second {tps:.0f}")
        recipe = published_recipe(project, cfg, h)
        if recipe and recipe["steps"] == steps:
            print(f"this is the published {h:g}h recipe:\n{recipe_command(recipe)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
