"""How the trainer spreads a model over processes (`--parallel ddp|fsdp`) and trades compute for memory
(`--activation_checkpointing`), without touching any model file (docs/training.md, "Scale").

Models expose `layers`, an nn.ModuleList of blocks; everything here works on those blocks.

- Activation checkpointing replaces each block's `forward` (an instance attribute: parameter names and
  state dicts stay exactly as they were) by one that runs the original forward under
  `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`: the block's inner activations are freed
  after the forward and recomputed in the backward. In fp32 the recomputation is bit-identical.
- FSDP (torch's FSDP2, `fully_shard`) shards each block, then the root (embeddings, final norm, output
  layer). Parameters, gradients and optimiser states live as DTensor shards; names stay clean. With
  `--precision bf16` the blocks compute in bf16 from fp32 master shards and reduce gradients in fp32.
  Under gradient accumulation only the last micro-step reduce-scatters gradients
  (`set_requires_gradient_sync`); parameters are resharded after every backward (the default, memory
  first), so each micro-step gathers them again.
- A world of one process has nothing to shard: `--parallel fsdp` then trains the plain model, exactly as
  `ddp` does, and writes the plain checkpoint format.
"""

import torch
from torch import nn

from languini.common_lib.errors import UserError

PARALLEL_MODES = ("ddp", "fsdp")


def blocks(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def check_parallel_config(cfg, world_size: int):
    """One line for combinations the trainer does not support."""
    mode = getattr(cfg, "parallel", "ddp")
    if mode not in PARALLEL_MODES:
        raise UserError(f"--parallel takes {' or '.join(PARALLEL_MODES)}, got '{mode}'")
    if mode != "fsdp" or world_size == 1:
        return
    if cfg.precision == "fp16":
        raise UserError("--parallel fsdp does not support --precision fp16 (its gradient scaler); use bf16 or fp32")
    if getattr(cfg, "optimizer", "adam") != "adam":
        raise UserError(f"--parallel fsdp supports --optimizer adam only, got '{cfg.optimizer}'; use --parallel ddp")


def uses_fsdp(cfg, world) -> bool:
    """True when the model is sharded: `--parallel fsdp` on more than one process."""
    return getattr(cfg, "parallel", "ddp") == "fsdp" and world.is_distributed


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in the backward (in place; names unchanged). Returns the model."""
    for block in blocks(model) or [model]:
        if getattr(block, "_languini_checkpointed", False):
            continue
        block.forward = _checkpointed(block.forward)
        block._languini_checkpointed = True
    return model


def _checkpointed(forward):
    def checkpointed_forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return checkpointed_forward


def apply_fsdp(model: nn.Module, precision: str) -> nn.Module:
    """Shard every block, then the root, over the default process group (FSDP2). Returns the model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if precision == "bf16":  # fp32 master weights, bf16 compute, fp32 gradient reduction
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (the tensor itself otherwise)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def full_value(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly partial or sharded) DTensor, e.g. a gradient norm; else `t`."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t
