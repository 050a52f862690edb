"""The optimiser and learning-rate schedule of the original recipe (DESIGN §5)."""

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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose factor times max_lr equals `lr_at_step` (so its state checkpoints with the run)."""

    def factor(step):
        return lr_at_step(step, cfg.max_lr, cfg.min_lr, cfg.decay_steps, cfg.warmup_steps) / cfg.max_lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
