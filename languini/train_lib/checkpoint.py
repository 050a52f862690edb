"""Checkpoints: everything needed to continue a run exactly, written atomically (docs/training.md).

A checkpoint is a dict saved with torch.save: `model` (a clean state dict, without the `module.` of DDP
or the `_orig_mod.` of torch.compile), `optimizer`, `scheduler`, `scaler`, `step` (completed steps),
`elapsed` (training wall seconds so far), `config`, and per process (indexed by rank): `loader`, `states`
(one recurrent state per micro-batch) and `rng` (python, numpy, torch and CUDA generator states).
"""

import random

import numpy as np
import torch

from languini.common_lib.atomic_io import atomic_torch_save
from languini.common_lib.errors import UserError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def clean_state_dict(state_dict: dict) -> dict:
    """Drop DDP / torch.compile wrapper components (`module.`, `_orig_mod.`) wherever they sit in a name.

    compile(DDP(m)) nests them at the front; compiling a block (`layers.0._orig_mod.`) puts one inside.
    """
    wrappers = {p.rstrip(".") for p in WRAPPER_PREFIXES}
    out = {}
    for name, value in state_dict.items():
        parts = name.split(".")
        while parts and parts[0] in wrappers:  # leading wrappers: any of them
            parts = parts[1:]
        out[".".join(p for p in parts if p != "_orig_mod")] = value  # inner wrappers: compile only
    return out


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, checkpoint: dict):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    atomic_torch_save(path, checkpoint)


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint written by this trainer (trusted: it holds numpy RNG and loader states)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except Exception as e:  # a foreign or truncated file: say which one
        raise UserError(f"cannot read checkpoint {path}: {e}") from None


def load_model_weights(model: torch.nn.Module, path: str) -> dict:
    """Load the `model` entry of a checkpoint into `model` (prefixes tolerated); returns the checkpoint."""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise UserError(f"{path} is not a languini checkpoint (no 'model' entry)")
    try:
        model.load_state_dict(clean_state_dict(checkpoint["model"]))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path} does not fit the config (a model flag overridden?): {first}") from None
    return checkpoint
