"""The optimiser and learning-rate schedule of the original recipe, and the Muon option (docs/training.md).

`--optimizer adam` (default) is the paper's recipe: Adam on every parameter. `--optimizer muon` trains the
hidden weight matrices (`hidden_matrices`) with `torch.optim.Muon` and everything else with the same Adam;
`MuonWithAdam` holds both and looks like one optimiser to the trainer, and one warm-up + cosine schedule
drives both (Muon's learning rate is Adam's times `muon_lr / max_lr`).
"""

import math

import torch
from torch import nn

from languini.common_lib.errors import UserError

# Devices whose fused Adam/AdamW kernel torch provides (CPU since torch 2.4): one pass over each tensor
# instead of a dozen elementwise kernels per parameter.
FUSED_ADAM_DEVICES = ("cuda", "cpu")


def lr_at_step(step: int, max_lr: float, min_lr: float, decay_steps: int, warmup_steps: int = 200) -> float:
    """Linear warm-up times cosine decay, with s = step + 1:

    lr(s) = min(s, W)/W * (min_lr + 1/2 (1 + cos(pi * min(s, D)/D)) (max_lr - min_lr)).
    """
    s = step + 1
    warmup = min(s, warmup_steps) / warmup_steps if warmup_steps > 0 else 1.0
    progress = min(s, decay_steps) / decay_steps if decay_steps > 0 else 1.0
    return warmup * (min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr))


def build_adam(params, cfg) -> torch.optim.Optimizer:
    """Adam(beta1, beta2, eps), AdamW when weight_decay > 0; torch's fused kernel on CPU and CUDA.

    Weight decay shrinks the weight matrices and tables (parameters of two or more dimensions) only: a group
    of its own holds the vectors (biases, norm gains), which are never decayed, as in GPT-2's recipe.

    The fused kernel does the for-loop Adam's arithmetic in one pass per tensor: the same numbers up to
    fp32 rounding (tests/test_optim.py), several times faster on a CPU (benchmarks/cpu_step.py). A
    checkpoint keeps its optimiser's kernel (the flags are part of each param group), so a resumed run
    uses the same kernel as before it stopped.
    """
    params = list(params)
    device_types = {p.device.type for p in params}
    fused = len(device_types) == 1 and device_types <= set(FUSED_ADAM_DEVICES)
    kwargs = dict(lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)
    if cfg.weight_decay > 0:
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW([g for g in groups if g["params"]], **kwargs)
    return torch.optim.Adam(params, **kwargs)


def output_layer(model: nn.Module, vocab_size: int) -> nn.Module | None:
    """The module producing the vocab-sized logits: the last nn.Linear with out_features == vocab_size."""
    found = None
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features == vocab_size:
            found = module
    return found


def hidden_matrices(model: nn.Module, vocab_size: int) -> list[nn.Parameter]:
    """The parameters Muon trains: every trainable 2-D parameter of the model except nn.Embedding weights
    and the output layer's (`output_layer`). Norms, biases, embeddings, the output layer and tensors of
    other ranks (e.g. per-head recurrent weights [heads, d, 4d]) stay with Adam."""
    excluded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = output_layer(model, vocab_size)
    if head is not None:
        excluded |= {id(p) for p in head.parameters()}
    return [p for p in model.parameters() if p.requires_grad and p.ndim == 2 and id(p) not in excluded]


def orthogonalise(matrix: torch.Tensor, coefficients, steps: int, eps: float, dtype) -> torch.Tensor:
    """Muon's quintic Newton–Schulz iteration in `dtype`: X <- aX + (bA + cA^2)X with A = XX^T, from
    X = M/||M|| (transposed to have no more rows than columns), the same operations as torch.optim.Muon."""
    a, b, c = coefficients
    x = matrix.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon_lr_factor(adjust_lr_fn: str | None, shape) -> float:
    """torch.optim.Muon's per-matrix lr factor: "original" sqrt(max(1, rows/cols)), "match_rms_adamw"
    0.2 sqrt(max(rows, cols))."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))


class Muon(torch.optim.Muon):
    """torch.optim.Muon (same arguments, checks, param groups and state), except that on a CPU the
    Newton–Schulz iteration runs in `cpu_dtype` (fp32): torch runs it in bf16, which a CPU without bf16
    matrix instructions (e.g. AVX2) multiplies 20-50x slower than fp32, so that a GPT mini step would spend
    minutes in it. On other devices `step` is torch's own."""

    cpu_dtype = torch.float32

    @torch.no_grad()
    def step(self, closure=None):
        if any(p.device.type != "cpu" for group in self.param_groups for p in group["params"]):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalise(
                    update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.cpu_dtype
                )
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * muon_lr_factor(group["adjust_lr_fn"], p.shape))
        return loss


class MuonWithAdam:
    """Muon for the hidden matrices and Adam for the rest, behind the optimiser interface the trainer uses:
    `step`, `zero_grad`, `param_groups` (Adam's groups first; a GradScaler unscales through them),
    `state_dict` / `load_state_dict` (one dict holding both optimisers' states)."""

    def __init__(self, adam: torch.optim.Optimizer, muon: torch.optim.Optimizer):
        self.adam, self.muon = adam, muon

    @property
    def param_groups(self) -> list[dict]:
        return self.adam.param_groups + self.muon.param_groups

    def step(self):
        self.adam.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True):
        self.adam.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"adam": self.adam.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state_dict: dict):
        if set(state_dict) != {"adam", "muon"}:
            raise ValueError("not a Muon + Adam optimiser state (was the run trained with --optimizer adam?)")
        self.adam.load_state_dict(state_dict["adam"])
        self.muon.load_state_dict(state_dict["muon"])


def build_optimizer(model: nn.Module, cfg):
    """`--optimizer adam`: Adam on all parameters. `--optimizer muon`: a MuonWithAdam (Muon on
    `hidden_matrices`, with `muon_lr`, `muon_momentum`, Nesterov and the "original" shape adjustment)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if getattr(cfg, "optimizer", "adam") == "adam":
        return build_adam(params, cfg)
    matrices = hidden_matrices(model, cfg.vocab_size)
    if not matrices:
        raise UserError("--optimizer muon: this model has no hidden weight matrices for Muon; use adam")
    in_muon = {id(p) for p in matrices}
    adam = build_adam([p for p in params if id(p) not in in_muon], cfg)
    muon = Muon(
        matrices,
        lr=cfg.muon_lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.muon_momentum,
        nesterov=True,
        adjust_lr_fn="original",
    )
    return MuonWithAdam(adam, muon)


class RecipeLR(torch.optim.lr_scheduler.LRScheduler):
    """Sets every group's lr to `lr_at_step(step) * scale` exactly (a LambdaLR factor would round
    max_lr * f); scale 1 for Adam, muon_lr / max_lr for Muon."""

    def __init__(self, optimizer, cfg, scale: float = 1.0, last_epoch=-1):
        self.recipe = (cfg.max_lr, cfg.min_lr, cfg.decay_steps, cfg.warmup_steps)
        self.scale = scale
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [lr_at_step(self.last_epoch, *self.recipe) * self.scale for _ in self.optimizer.param_groups]


class MuonWithAdamLR:
    """The recipe's one schedule on both optimisers of a MuonWithAdam: Adam's groups follow it from max_lr,
    Muon's the same curve scaled to peak at muon_lr. `get_last_lr()[0]` is Adam's lr (the logged lr)."""

    def __init__(self, optimizer: MuonWithAdam, cfg):
        self.adam = RecipeLR(optimizer.adam, cfg)
        self.muon = RecipeLR(optimizer.muon, cfg, scale=cfg.muon_lr / cfg.max_lr)

    def step(self):
        self.adam.step()
        self.muon.step()

    def get_last_lr(self) -> list[float]:
        return self.adam.get_last_lr() + self.muon.get_last_lr()

    def state_dict(self) -> dict:
        return {"adam": self.adam.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state_dict: dict):
        self.adam.load_state_dict(state_dict["adam"])
        self.muon.load_state_dict(state_dict["muon"])


def build_scheduler(optimizer, cfg):
    """The recipe's schedule as an LRScheduler (or one per optimiser of a MuonWithAdam), so its state
    checkpoints with the run."""
    if isinstance(optimizer, MuonWithAdam):
        return MuonWithAdamLR(optimizer, cfg)
    return RecipeLR(optimizer, cfg)
