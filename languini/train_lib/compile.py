"""How `--compile` compiles a model and the loss: one place for the trainer and the throughput tool.

A model with a `layers` ModuleList (GPT, quasi-LSTM) has each block compiled on its own: the blocks share
one compiled graph (torch.compile treats the parameters as inputs), so a 12-layer model compiles about as
fast as a 1-layer one and the math is unchanged. Anything else is compiled whole. Modules are compiled in
place (`nn.Module.compile`), so parameter names, state dicts and checkpoints carry no `_orig_mod.`.

`--compile max-autotune` runs Inductor's `max-autotune-no-cudagraphs` mode: plain `max-autotune` also
captures CUDA graphs, whose outputs live in a static pool that the next replay overwrites, and the
recurrent states that the trainer carries from one step to the next are such outputs.

Under FSDP (`hooks_outside=True`) each block's `forward` method is compiled instead of the whole module
call, so FSDP's hooks (which gather and free the shards around the block) stay outside the compiled graph.
"""

from collections.abc import Callable

import torch
from torch import nn

from languini.train_lib.loss import lm_loss

COMPILE_MODES = ("none", "default", "max-autotune")
# --compile value -> torch.compile mode; CUDA graphs stay off (states carried between steps are graph outputs)
INDUCTOR_MODES = {"default": None, "max-autotune": "max-autotune-no-cudagraphs"}


def _compile_kwargs(mode: str) -> dict:
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode '{mode}'; valid: {', '.join(COMPILE_MODES)}")
    inductor_mode = INDUCTOR_MODES[mode]
    return {} if inductor_mode is None else {"mode": inductor_mode}


def compile_model(model: nn.Module, mode: str, hooks_outside: bool = False) -> nn.Module:
    """Compile `model` in place for `--compile mode` (per block when it has `layers`); returns it.

    `hooks_outside`: compile each block's `forward` (an instance attribute), leaving the module's hooks
    eager (FSDP)."""
    if mode == "none":
        return model
    kwargs = _compile_kwargs(mode)
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        for layer in layers:
            if hooks_outside:
                layer.forward = torch.compile(layer.forward, **kwargs)
            else:
                layer.compile(**kwargs)
    else:
        model.compile(**kwargs)
    return model


def compile_loss(mode: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`lm_loss`, compiled unless mode is `none` (the compiled loss fuses the fp32 upcast of the logits)."""
    if mode == "none":
        return lm_loss
    return torch.compile(lm_loss, **_compile_kwargs(mode))
