"""Checkpoints: everything needed to continue a run exactly, written atomically and read safely
(docs/training.md, docs/reliability.md).

A checkpoint is a dict saved with torch.save: `model` (a clean state dict, without the `module.` of DDP
or the `_orig_mod.` of torch.compile), `optimizer`, `scheduler`, `scaler`, `step` (completed steps),
`elapsed` (training wall seconds so far), `config`, `world_size`, `corpus` (the identity of the corpus it
trains on) and per process (indexed by rank): `loader`, `states` (one recurrent state per micro-batch),
`rng` (python, numpy, torch and CUDA generator states) and `window` (the losses summed since the last
report).

Under `--parallel fsdp` the weights and the optimiser are not in that file: its `model` and `optimizer`
entries are empty and `sharded` names a folder beside it (`step_<N>.<id>.dcp/`) written by
torch.distributed.checkpoint (DCP), one shard file per process plus `.metadata`. The folder is written
first and the small file, which names it, replaces the previous one atomically afterwards; only then is
the previous folder deleted. A crash at any point leaves a loadable pair. DCP reshards on load, so such a
checkpoint loads on any number of processes, sharded or not (`load_sharded`).

Everything in it is a tensor or plain Python data (dict, list, tuple, str, int, float, bool, None), so it
is read with `torch.load(weights_only=True)`: a file that holds any other Python object is refused
before anything in it runs. The RNG states of Python and NumPy are converted to tensors and ints for that.
"""

import contextlib
import math
import os
import pickle
import random
import re
import reprlib
import shutil
import warnings

import numpy as np
import torch

from languini.common_lib.atomic_io import atomic_torch_save
from languini.common_lib.errors import UserError
from languini.train_lib.optim import MuonWithAdam, MuonWithAdamLR

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_checkpoint_wrapped_module.")
# The entries a checkpoint must have to be resumed, with their types.
TRAINING_ENTRIES = {
    "model": dict, "optimizer": dict, "scheduler": dict, "step": int, "elapsed": (int, float),
    "world_size": int, "loader": list, "states": list, "rng": list,
}  # fmt: skip


def clean_state_dict(state_dict: dict) -> dict:
    """Drop DDP / torch.compile / activation-checkpoint wrapper components (`module.`, `_orig_mod.`,
    `_checkpoint_wrapped_module.`) wherever they sit in a name.

    compile(DDP(m)) nests them at the front; compiling or wrapping a block (`layers.0._orig_mod.`) puts one
    inside.
    """
    wrappers = {p.rstrip(".") for p in WRAPPER_PREFIXES}
    inner = wrappers - {"module"}  # `module` may be a real submodule's name inside a model
    out = {}
    for name, value in state_dict.items():
        parts = name.split(".")
        while parts and parts[0] in wrappers:  # leading wrappers: any of them
            parts = parts[1:]
        out[".".join(p for p in parts if p not in inner)] = value  # inner wrappers: compile, checkpointing
    return out


def rng_state() -> dict:
    """This process's generator states as tensors and plain Python values (safe to load)."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": [int(version), torch.tensor(internal, dtype=torch.int64), gauss_next],
        "numpy": {
            "name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    """Restore the generator states saved by `rng_state`."""
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal.tolist()), gauss_next))
    numpy = state["numpy"]
    np.random.set_state((
        numpy["name"], numpy["keys"].numpy().astype(np.uint32), int(numpy["pos"]), int(numpy["has_gauss"]),
        float(numpy["cached_gaussian"]),
    ))  # fmt: skip
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, checkpoint: dict):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    atomic_torch_save(path, checkpoint)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), for one-line errors."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def load_checkpoint(path: str):
    """Read a checkpoint without running any code from it (`weights_only=True`): tensors and plain data only.

    Anything else (a pickled object, a damaged or foreign file) is refused with one line.
    """
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files: not our line
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not found and "Unsupported operand" in str(e):  # not a pickle at all: text, another format
            raise UserError(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint (damaged or another format)") from None
        named = f" ({found.group(1)})" if found else ""
        raise UserError(
            f"refusing to load {path}: it holds Python objects other than tensors and plain data{named}, "
            "which could run code; languini checkpoints never do (re-create one written by an older version)"
        ) from None
    except Exception as e:  # a foreign or truncated file: say which one
        raise UserError(f"cannot read checkpoint {path}: {first_line(e)}") from None


def check_training_checkpoint(checkpoint, path: str):
    """Refuse, in one line, a loadable file that lacks what resuming needs (a foreign or hand-made file)."""
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} is not a languini checkpoint (it holds a {type(checkpoint).__name__}, not a dict)")
    missing = [k for k in TRAINING_ENTRIES if k not in checkpoint]
    if missing:
        raise UserError(f"{path} is not a training checkpoint of languini (no {', '.join(missing)})")
    wrong = [k for k, kind in TRAINING_ENTRIES.items() if not isinstance(checkpoint[k], kind)]
    if wrong:
        raise UserError(f"{path} is damaged: its '{wrong[0]}' entry is a {type(checkpoint[wrong[0]]).__name__}")
    world = checkpoint["world_size"]
    short = [k for k in ("loader", "states", "rng") if len(checkpoint[k]) != world]
    if short:
        raise UserError(f"{path} is damaged: '{short[0]}' has {len(checkpoint[short[0]])} entries for {world} processes")
    if isinstance(checkpoint["step"], bool) or checkpoint["step"] < 0:
        raise UserError(f"{path} is damaged: its step {checkpoint['step']!r} is not a count of steps")
    config = checkpoint.get("config")  # absent or None in hand-made files: the run's own config is used
    if config is not None and not isinstance(config, dict):
        raise UserError(f"{path} is damaged: its 'config' entry is a {type(config).__name__}, not a dict")


def _kind(value):
    """The form of plain data, to compare a saved entry with the live one: numbers, flags, strings and None
    by type, lists and tuples element by element, dicts key by key."""
    if isinstance(value, bool) or value is None:
        return repr(type(value))
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return [_kind(v) for v in value]
    if isinstance(value, dict):
        return {k: _kind(v) for k, v in value.items()}
    return type(value).__name__


def _entry_problem(saved: dict, live: dict, required) -> str | None:
    """The first of `required` keys missing from `saved`, or the first key both hold in different forms
    (None, torch's "default" for a setting, fits any form)."""
    missing = [k for k in required if k not in saved]
    if missing:
        return f"lacks {', '.join(map(str, missing))}"
    both = [k for k in live if saved.get(k) is not None and live[k] is not None]
    differ = next((k for k in both if _kind(saved[k]) != _kind(live[k])), None)
    if differ is not None:
        return f"has {differ} = {reprlib.repr(saved[differ])}, this run {reprlib.repr(live[differ])}"
    return None


def check_scheduler_state(state, scheduler, path: str, step: int):
    """Refuse, in one line, a `scheduler` entry that is not the schedule of this run after `step` steps.

    torch's schedulers load any dict into their attributes, so a foreign one would silently restart the
    schedule. Every entry the live scheduler saves must be there in the same form (entries that the
    scheduler's class defaults, flags newer torch versions added, may be absent) and `last_epoch`, which
    the trainer advances once per step from 0, must equal `step`.
    """
    for name, live, saved in _muon_and_adam_parts(scheduler, MuonWithAdamLR, state, path, "schedule"):
        if not isinstance(saved, dict):
            raise UserError(f"{path} is damaged: its {name} state is a {type(saved).__name__}, not a dict")
        live_state = live.state_dict()
        problem = _entry_problem(saved, live_state, [k for k in live_state if not hasattr(type(live), k)])
        if problem is None and saved["last_epoch"] != step:
            problem = f"is at step {saved['last_epoch']!r}, the checkpoint at step {step}"
        if problem:
            raise UserError(f"{path} does not fit this run: its {name} state {problem}")


def _muon_and_adam_parts(live, combined: type, state, path: str, what: str) -> list:
    """(name, part, saved state) of each part of `live`: its Adam and its Muon when it is a `combined` one
    (MuonWithAdam, MuonWithAdamLR), else itself alone."""
    if not isinstance(live, combined):
        return [(what, live, state)]
    if not isinstance(state, dict) or set(state) != {"adam", "muon"}:
        raise UserError(
            f"{path} does not fit this run: its {what} state is not a Muon + Adam one "
            "(was the run trained with --optimizer adam?)"
        )
    return [(f"Adam {what}", live.adam, state["adam"]), (f"Muon {what}", live.muon, state["muon"])]


def check_optimizer_state(checkpoint: dict, optimizer, path: str):
    """Refuse, in one line, an `optimizer` entry of `checkpoint` that does not fit `optimizer`, before it
    is loaded.

    torch loads whatever tensors the entry holds, and its fused kernels then read and write them as if they
    had their parameter's size: a damaged or crafted file could corrupt memory. The entry must have the
    optimiser's parameter groups with as many parameters each, a state only for those parameters, holding
    the entries the optimiser keeps (Adam: step, exp_avg, exp_avg_sq; Muon: momentum_buffer), each buffer
    exactly its parameter's shape in a floating dtype and `step` a scalar. After training steps each
    optimiser must hold a state, except in an fp16 run, whose grad scaler may have skipped every update.
    """
    stepped = checkpoint["step"] > 0 and checkpoint.get("scaler") is None
    for name, live, saved in _muon_and_adam_parts(optimizer, MuonWithAdam, checkpoint["optimizer"], path, "optimizer"):
        problem = _optimizer_problem(saved, live)
        if problem is None and stepped and not saved["state"]:
            problem = f"is empty after {checkpoint['step']} steps"
        if problem:
            raise UserError(f"{path} does not fit this run: its {name} state {problem}")


def _optimizer_problem(saved, live: torch.optim.Optimizer) -> str | None:
    """Why `saved` is not a state of `live` (see check_optimizer_state), or None."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or not isinstance(saved.get("state"), dict):
        return "is not an optimizer state (a dict of 'state' and 'param_groups')"
    live_groups = live.param_groups
    if len(groups) != len(live_groups):
        return f"has {len(groups)} parameter groups, this run's optimizer {len(live_groups)}"
    params = {}  # saved parameter number -> (live parameter, saved group): torch pairs them in order
    for i, (group, live_group) in enumerate(zip(groups, live_groups)):
        numbers = group.get("params") if isinstance(group, dict) else None
        if not isinstance(numbers, list) or not all(type(n) is int for n in numbers):
            return f"has a parameter group {i} without a list of parameter numbers"
        if len(numbers) != len(live_group["params"]):
            return f"has {len(numbers)} parameters in group {i}, this run's {len(live_group['params'])}"
        problem = _entry_problem(group, {k: v for k, v in live_group.items() if k != "params"}, [])
        if problem:
            return f"group {i} {problem}"
        params.update((n, (p, group)) for n, p in zip(numbers, live_group["params"]))
    if len(params) != sum(len(g["params"]) for g in live_groups):
        return "numbers a parameter twice"
    for number, entries in saved["state"].items():
        if number not in params:
            return f"has an entry for parameter {reprlib.repr(number)}, which the optimizer does not have"
        problem = _parameter_state_problem(entries, *params[number], live)
        if problem:
            return f"of parameter {number} {problem}"
    return None


def _parameter_state_problem(entries, param: torch.Tensor, group: dict, live) -> str | None:
    """Why `entries` is not the state `live` keeps for `param` (of the saved `group`), or None."""
    if not isinstance(entries, dict):
        return f"is a {type(entries).__name__}, not a dict"
    missing = _state_keys(live, group) - set(entries)
    if missing:
        return f"lacks {', '.join(sorted(missing))}"
    for key, value in entries.items():
        if key == "step":
            count = value.item() if isinstance(value, torch.Tensor) and value.dim() == 0 else value
            if isinstance(count, bool) or not isinstance(count, (int, float)) or not 0 <= count < math.inf:
                return f"has step {_describe(value)}, not a count"
        elif not (
            isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == param.shape
        ):
            return f"has {key} {_describe(value)}, its parameter is {_describe(param)}"
    return None


def _state_keys(optimizer, group: dict) -> set:
    """The entries torch's Adam / AdamW and Muon keep per parameter (none required of another optimiser)."""
    if isinstance(optimizer, torch.optim.Muon):
        return {"momentum_buffer"}
    if isinstance(optimizer, torch.optim.Adam):  # AdamW too
        return {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group.get("amsgrad") else set())
    return set()


def _describe(value) -> str:
    """A tensor as its shape and dtype (`4x3 float32`, `scalar int64`), anything else as a short repr."""
    if isinstance(value, torch.Tensor):
        return f"{_shape(value) or 'scalar'} {str(value.dtype).removeprefix('torch.')}"
    return reprlib.repr(value)


def _shape(value) -> str:
    return "x".join(map(str, value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def load_model_state(model: torch.nn.Module, state_dict, path: str):
    """Load a checkpoint's `model` entry into `model`; a mismatch is one line naming the first differences."""
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) for k in state_dict):
        raise UserError(f"{path} is damaged: its 'model' entry is not a state dict")
    given, expected = clean_state_dict(state_dict), model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in given]
    problems += [f"unexpected {k}" for k in given if k not in expected]
    problems += [
        f"{k} is {_shape(given[k])}, the model's {_shape(v)}"
        for k, v in expected.items()
        if k in given and (not isinstance(given[k], torch.Tensor) or given[k].shape != v.shape)
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(
            f"{path} does not fit the config (a model flag changed?): {'; '.join(problems[:3])}{more}"
        )
    try:
        model.load_state_dict(given)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit the config: {first_line(e)}") from None


def load_model_weights(model: torch.nn.Module, path: str) -> dict:
    """Load the `model` entry of a checkpoint into `model` (prefixes tolerated; a sharded checkpoint's
    weights come from its DCP folder); returns the checkpoint."""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        kind = "dict" if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise UserError(f"{path} is not a languini checkpoint (a {kind} without a 'model' entry)")
    if checkpoint.get("sharded"):
        load_sharded(sharded_folder(path, checkpoint), path, model)
    else:
        load_model_state(model, checkpoint["model"], path)
    return checkpoint


SHARDED_NAME = re.compile(r"step_\d+\.[0-9a-f]+\.dcp")  # the DCP folders the trainer writes


def sharded_folder(path: str, checkpoint: dict) -> str:
    """The DCP folder a sharded checkpoint names (beside `path`); one line when it is odd or missing."""
    name = checkpoint.get("sharded")
    if not isinstance(name, str) or not SHARDED_NAME.fullmatch(name):
        raise UserError(f"{path} is damaged: its 'sharded' entry {name!r} is not a checkpoint folder name")
    folder = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    if not os.path.isfile(os.path.join(folder, ".metadata")):
        raise UserError(f"{path} names the sharded checkpoint {folder}, which is missing or incomplete")
    return folder


def remove_sharded_folders(folder: str, keep: str | None = None) -> list[str]:
    """Delete the sharded checkpoint folders in `folder` (the trainer's names, SHARDED_NAME) except `keep`
    (the one latest.pt names): the previous one, any that a killed save left behind, or all of them for
    --overwrite. Returns the removed paths."""
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) and not os.path.islink(folder) else []:
        path = os.path.join(folder, name)
        if name != keep and SHARDED_NAME.fullmatch(name) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def save_sharded(folder: str, model: torch.nn.Module, optimizer):
    """Write the model and optimiser (sharded DTensors under FSDP, else full tensors) into `folder` (DCP);
    every process takes part."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    with dcp_failures_as_exceptions():
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=folder, no_dist=not dist.is_initialized())


@contextlib.contextmanager
def dcp_failures_as_exceptions():
    """Re-raise DCP's CheckpointException (a BaseException, which `except Exception` lets through, holding
    every failing rank's error and traceback) as the first failing rank's own exception: a full disk
    becomes the OSError it was, which the callers turn into one line."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        failures = e.failures
        if not failures:
            raise
        raise failures[min(failures)][0] from None


def load_sharded(folder: str, path: str, model: torch.nn.Module, optimizer=None):
    """Load a DCP checkpoint into `model` (and `optimizer`), resharded for this process's layout: sharded
    (FSDP, any number of processes) or whole (one process, DDP, evaluation)."""
    import torch.distributed as dist

    no_dist = not dist.is_initialized()
    try:
        with warnings.catch_warnings():  # DCP says it loads in a single process: that is the intent here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            _load_sharded(folder, model, optimizer, no_dist)
    except UserError:
        raise
    except Exception as e:  # a shard that does not fit (another model), a damaged file
        raise UserError(f"{path} does not fit this run: its sharded weights cannot be loaded ({first_line(e)})") from None


def _load_sharded(folder: str, model: torch.nn.Module, optimizer, no_dist: bool):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if optimizer is None:
        state = {"model": clean_state_dict(model.state_dict())}
        with dcp_failures_as_exceptions():
            dcp.load(state, checkpoint_id=folder, no_dist=no_dist)
        model.load_state_dict(state["model"])
        return
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    with dcp_failures_as_exceptions():
        dcp.load(state, checkpoint_id=folder, no_dist=no_dist)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_full_into_sharded(checkpoint: dict, path: str, model: torch.nn.Module, optimizer):
    """Load a plain (one-file) checkpoint's model and optimiser into an FSDP-sharded model and its
    optimiser: every process reads the full tensors and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    given = checkpoint["model"]
    if not isinstance(given, dict):
        raise UserError(f"{path} is damaged: its 'model' entry is not a state dict")
    given = clean_state_dict(given)
    expected = model.state_dict()  # DTensor shapes are the global ones
    problems = [f"missing {k}" for k in expected if k not in given] + [f"unexpected {k}" for k in given if k not in expected]
    problems += [f"{k} is {_shape(given[k])}, the model's {_shape(v)}" for k, v in expected.items()
                 if k in given and (not isinstance(given[k], torch.Tensor) or given[k].shape != v.shape)]  # fmt: skip
    if problems:
        raise UserError(f"{path} does not fit the config (a model flag changed?): {'; '.join(problems[:3])}")
    check_optimizer_state(checkpoint, optimizer, path)
    try:
        optim_sd = _optimizer_state_by_name(checkpoint["optimizer"], optimizer, model)
        set_state_dict(
            model, optimizer, model_state_dict=given, optim_state_dict=optim_sd,
            options=StateDictOptions(full_state_dict=True),
        )  # fmt: skip
    except Exception as e:
        raise UserError(f"{path} does not fit this run: its optimizer state cannot be restored ({first_line(e)})") from None


def _optimizer_state_by_name(state: dict, optimizer, model: torch.nn.Module) -> dict:
    """`optimizer.state_dict()` (parameters numbered in group order) keyed by parameter names instead, the
    form torch.distributed.checkpoint.state_dict uses."""
    names = {id(p): clean_name for clean_name, p in clean_state_dict(dict(model.named_parameters())).items()}
    by_number = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = []
    for group in state["param_groups"]:
        groups.append({**group, "params": [by_number[i] for i in group["params"]]})
    return {"state": {by_number[i]: s for i, s in state["state"].items()}, "param_groups": groups}
