"""Compute classes: reference-GPU hours (or a FLOP budget) turned into training steps.

A compute class is a budget of accelerator hours on the reference GPU, an NVIDIA RTX 3090. A config that
processes `tokens_per_second` tokens on that GPU trains for

    steps = round(hours * 3600 * tokens_per_second / (train_batch_size * seq_len)).

The reference throughputs below are the original paper's measurements at each preset's best batch size.
"""

import dataclasses
import math

from languini.common_lib.errors import UserError
from languini.projects import load_project
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


def _positive(**values):
    """Refuse (one line) any value that is not a finite number > 0."""
    for name, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"{name} must be a finite number > 0, got {value}")


def _at_least_one_step(steps: float, budget: str, step_cost: str) -> int:
    """`steps` rounded; a budget below one step, or too large to count, is one line."""
    if not math.isfinite(steps):
        raise UserError(f"{budget} is too large a budget to count in steps")
    if round(steps) < 1:
        raise UserError(f"{budget} is less than one training step ({step_cost} per step)")
    return round(steps)


def steps_for(hours: float, tokens_per_second: float, train_batch_size: int, seq_len: int) -> int:
    """Optimiser steps that fill `hours` on a GPU processing `tokens_per_second` (at least one)."""
    _positive(hours=hours, tokens_per_second=tokens_per_second, train_batch_size=train_batch_size, seq_len=seq_len)
    tokens_per_step = train_batch_size * seq_len
    steps = hours * 3600 * tokens_per_second / tokens_per_step
    return _at_least_one_step(steps, f"{hours:g} hours", f"{tokens_per_step / tokens_per_second:.3g} s")


def steps_for_flops(flops: float, flops_per_token: float, train_batch_size: int, seq_len: int) -> int:
    """Optimiser steps that spend a FLOP budget (a hardware-independent compute class; at least one)."""
    _positive(flops=flops, flops_per_token=flops_per_token)
    step_flops = flops_per_token * train_batch_size * seq_len
    return _at_least_one_step(flops / step_flops, f"{flops:.3g} FLOPs", f"{step_flops:.3g} FLOPs")


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
    """Config fields (outside the shared training fields, plus seq_len and the optimiser) that differ from the preset's,
    i.e. the reasons a preset's published throughput would not describe this config."""
    preset = load_project(project).preset_config(cfg.preset)
    # the optimiser counts too: Muon's orthogonalisation costs time (and FLOPs) Adam's published step does not
    shared = {f.name for f in dataclasses.fields(TrainConfig)} - {"seq_len", "vocab_size", "optimizer"}
    shared |= SAME_PUBLISHED_THROUGHPUT.get(project, set())
    return [
        f.name for f in dataclasses.fields(cfg) if f.name not in shared and getattr(cfg, f.name) != getattr(preset, f.name)
    ]
