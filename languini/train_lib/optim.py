"""The optimiser and learning-rate schedule of the original recipe (docs/training.md)."""

import math

import torch


def lr_at_step(step: int, max_lr: float, min_lr: float, decay_steps: int, warmup_steps: int = 200) -> float:
    """Linear warm-up times cosine decay, with s = step + 1:

    lr(s) = min(s, W)/W * (min_lr + 1/2 (1 + cos(pi * min(s, D)/D)) (max_lr - min_lr)).
    """
    s = step + 1
    warmup = min(s, warmup_steps) / warmup_steps if warmup_steps > 0 else 1.0
    progress = min(s, decay_steps) / decay_steps if decay_steps > 0 else 1.0
    return warmup * (min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr))


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """Adam(beta1, beta2, eps) without weight decay by default; fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.is_cuda for p in params)
    kwargs = dict(lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)
    if cfg.weight_decay > 0:
        return torch.optim.AdamW(params, weight_decay=cfg.weight_decay, **kwargs)
    return torch.optim.Adam(params, **kwargs)


class RecipeLR(torch.optim.lr_scheduler.LRScheduler):
    """Sets every group's lr to `lr_at_step(step)` exactly (a LambdaLR factor would round max_lr * f)."""

    def __init__(self, optimizer, cfg, last_epoch=-1):
        self.recipe = (cfg.max_lr, cfg.min_lr, cfg.decay_steps, cfg.warmup_steps)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [lr_at_step(self.last_epoch, *self.recipe) for _ in self.optimizer.param_groups]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> RecipeLR:
    """The recipe's schedule as an LRScheduler, so its state checkpoints with the run."""
    return RecipeLR(optimizer, cfg)
