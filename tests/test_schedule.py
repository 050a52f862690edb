"""The learning-rate schedule of the original recipe (docs/training.md), through the scheduler the trainer uses."""

import pytest
import torch
from helpers import preset_config

from languini.train_lib.optim import build_optimizer, build_scheduler, lr_at_step


def _scheduled_lrs(cfg, n_steps):
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    lrs = []
    for _ in range(n_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_schedule_values_with_decay_steps_1000():
    cfg = preset_config("gpt", "mini")
    cfg.decay_steps = 1000
    lrs = _scheduled_lrs(cfg, 1005)
    assert lrs[0] == pytest.approx(3.0e-6, rel=1e-5)
    assert lrs[199] == pytest.approx(5.433e-4, rel=1e-4)
    for step in (999, 1000, 1004):
        assert lr_at_step(step, cfg.max_lr, cfg.min_lr, cfg.decay_steps, cfg.warmup_steps) == 6e-6
        assert lrs[step] == 6e-6  # exactly, not max_lr * factor
    assert lr_at_step(10**6, cfg.max_lr, cfg.min_lr, cfg.decay_steps) == 6e-6


def test_warmup_is_linear_and_peak_is_max_lr():
    cfg = preset_config("gpt", "mini")
    cfg.decay_steps = 10**9  # no decay to speak of: the warm-up alone
    lrs = _scheduled_lrs(cfg, 250)
    assert lrs[99] == pytest.approx(cfg.max_lr / 2, rel=1e-6)
    assert max(lrs) == pytest.approx(cfg.max_lr, rel=1e-6)
    assert lrs.index(max(lrs)) >= 199
