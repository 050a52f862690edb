"""Fields shared by every project's config: data, optimiser recipe, schedule, logging, run folder.

A project's `configs.py` subclasses `TrainConfig` with its model fields and defines its presets.
Defaults reproduce the original Languini recipe (docs/training.md).
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from languini.common_lib.config import cfg_field
from languini.common_lib.errors import UserError
from languini.dataset_lib.layout import END_OF_DOC


@dataclass
class TrainConfig:
    # `--max_train_steps N` alone also sets the cosine decay to N steps (the schedule ends with the run)
    FOLLOWS: ClassVar[dict] = {"decay_steps": "max_train_steps"}

    # identity
    project: str = cfg_field("", "project name (set by the project's configs.py)")
    preset: str = cfg_field("", "preset the config was built from (set by the parser)")
    exp_name: str = cfg_field("", "experiment name; empty = derived from the config")
    run_dir: str = cfg_field("", "run folder; empty = runs/<project>/<exp_name>")
    resume: str = cfg_field("", "'auto' continues the run in run_dir from its last checkpoint")
    overwrite: bool = cfg_field(False, "allow reusing a run folder that holds another run")
    seed: int = cfg_field(0, "random seed (model init and anything random in training)")
    debug: bool = cfg_field(False, "adds a _debug suffix to the experiment name")

    # data
    data_root: str = cfg_field("data/books", "corpus folder holding the file_list_*.npy split lists")
    dataset: str = cfg_field("books_16384", "tokenised dataset folder inside data_root")
    vocab_size: int = cfg_field(16384, "vocabulary size; must match the dataset's tokenizer")
    seq_len: int = cfg_field(512, "tokens per training sequence")

    # optimiser and schedule
    train_batch_size: int = cfg_field(16, "global sequences per optimiser step (all GPUs, all micro-steps)")
    gradient_accumulation_steps: int = cfg_field(1, "micro-steps per optimiser step")
    eval_batch_size: int = cfg_field(16, "global sequences per validation step")
    test_batch_size: int = cfg_field(16, "windows per batch in the final evaluation (eval.py)")
    max_eval_steps: int = cfg_field(500, "batches per validation during training (-1 = whole split)")
    max_train_steps: int = cfg_field(500_000, "total optimiser steps")
    decay_steps: int = cfg_field(500_000, "steps of the cosine decay from max_lr to min_lr")
    warmup_steps: int = cfg_field(200, "linear warm-up steps")
    max_lr: float = cfg_field(6e-4, "peak learning rate")
    min_lr: float = cfg_field(6e-6, "final learning rate")
    beta1: float = cfg_field(0.9, "Adam beta1")
    beta2: float = cfg_field(0.95, "Adam beta2")
    adam_eps: float = cfg_field(1e-8, "Adam epsilon")
    weight_decay: float = cfg_field(0.0, "decoupled weight decay of the weight matrices and tables, never of biases or norm gains (the original uses none)")
    optimizer: str = cfg_field(
        "adam", "adam: the paper's recipe; muon: Muon on hidden matrices, Adam on the rest", ["adam", "muon"]
    )
    muon_lr: float = cfg_field(0.02, "Muon's peak learning rate (the schedule scales it like max_lr)")
    muon_momentum: float = cfg_field(0.95, "Muon momentum (Nesterov)")
    grad_clip_norm: float = cfg_field(0.0, "gradient-norm clipping; 0 = off")
    tokens_per_second: float = cfg_field(
        0.0, "reference-GPU throughput of this config; enables the reference-GPU-hours axis"
    )

    # evaluation protocol
    last_n: int = cfg_field(128, "final eval: tokens scored at the end of each sliding window")
    eval_data_split: str = cfg_field("test", "split(s) for eval.py: a split name or 'all'")

    # hardware, precision, compile
    device: str = cfg_field("auto", "device to train on", choices=["auto", "cpu", "cuda"])
    precision: str = cfg_field(
        "auto", "auto = bf16 on capable GPUs, fp32 on CPU", choices=["auto", "fp32", "bf16", "fp16"]
    )
    compile: str = cfg_field("none", "torch.compile mode", choices=["none", "default", "max-autotune"])
    parallel: str = cfg_field(
        "ddp", "several processes: ddp replicates the model, fsdp shards it (FSDP2)", choices=["ddp", "fsdp"]
    )
    activation_checkpointing: bool = cfg_field(False, "recompute each block's activations in the backward")

    # logging cadence
    eval_every: int = cfg_field(1000, "validate every N steps (0 = never)")
    log_terminal_every: int = cfg_field(100, "print a terminal line every N steps")
    log_metrics_every: int = cfg_field(100, "write train metrics every N steps")
    log_grads_every: int = cfg_field(1000, "write the gradient norm and the weights' norm every N steps (0 = never)")
    log_ckpt_every: int = cfg_field(5000, "checkpoint every N steps (and always at the end)")
    ckpt_every_minutes: float = cfg_field(
        30.0, "also checkpoint when this many minutes passed since the last checkpoint (0 = off)"
    )
    logger_type: str = cfg_field("tb", "extra metric sinks", choices=["none", "tb", "wandb", "all"])
    wandb_project_name: str = cfg_field("languini", "wandb project")
    progress_bar: bool = cfg_field(True, "show a tqdm progress bar with ETA")


# The data and schedule of every project's `nano` preset (the project adds its model widths): the demo
# corpus and a short schedule that trains in minutes on two CPU cores. last_n is a quarter of seq_len, as
# the full presets' 128 of 512: every token the sliding window scores sees at least 96 tokens of context.
NANO_SCHEDULE = dict(
    seq_len=128, last_n=32, data_root="data/demo", dataset="demo_4096", vocab_size=4096,
    train_batch_size=16, eval_batch_size=16, test_batch_size=16, max_eval_steps=20,
    max_train_steps=1000, decay_steps=1000, warmup_steps=100,
    eval_every=200, log_terminal_every=50, log_metrics_every=10, log_grads_every=100, log_ckpt_every=500,
)  # fmt: skip


def check_config(cfg):
    """Reject nonsensical settings with one clear line before anything is written or trained.

    Model fields (those a project adds to TrainConfig) that are integers are sizes and must be >= 1.
    """
    def require(ok: bool, message: str):
        if not ok:
            raise UserError(message)

    # max_train_steps first: given alone it also sets decay_steps, and the message must name the flag typed
    for name in ("max_train_steps", "seq_len", "train_batch_size", "eval_batch_size", "test_batch_size", "decay_steps"):
        require(getattr(cfg, name) >= 1, f"--{name} must be at least 1, got {getattr(cfg, name)}")
    require(cfg.vocab_size > END_OF_DOC, f"--vocab_size must exceed the special ids 0..{END_OF_DOC}")
    require(cfg.warmup_steps >= 0, f"--warmup_steps must be >= 0, got {cfg.warmup_steps}")
    require(cfg.max_eval_steps == -1 or cfg.max_eval_steps >= 1, "--max_eval_steps must be -1 (all) or >= 1")
    for name in ("max_lr", "min_lr", "adam_eps", "weight_decay", "grad_clip_norm", "tokens_per_second"):
        value = getattr(cfg, name)
        require(math.isfinite(value) and value >= 0, f"--{name} must be a finite number >= 0, got {value}")
    require(cfg.max_lr > 0 and cfg.adam_eps > 0, "--max_lr and --adam_eps must be > 0")
    for name in ("beta1", "beta2"):
        require(0 <= getattr(cfg, name) < 1, f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    muon_ok = 0 < cfg.muon_lr < math.inf and 0 <= cfg.muon_momentum < 1
    require(muon_ok, f"need --muon_lr > 0, --muon_momentum in [0, 1); got {cfg.muon_lr}, {cfg.muon_momentum}")
    require(cfg.min_lr <= cfg.max_lr, f"--min_lr {cfg.min_lr} is above --max_lr {cfg.max_lr}; the decay ends at min_lr")
    minutes = cfg.ckpt_every_minutes
    require(math.isfinite(minutes) and minutes >= 0, f"--ckpt_every_minutes must be a finite number >= 0 (0 = off), got {minutes}")
    for name in ("eval_every", "log_terminal_every", "log_metrics_every", "log_grads_every", "log_ckpt_every"):
        require(getattr(cfg, name) >= 0, f"--{name} must be >= 0 (0 = never), got {getattr(cfg, name)}")
    parts = cfg.exp_name.split("/")  # nested names (study/gpt_3e12) are folders below runs/<project>/
    inside = not cfg.exp_name or (all(p not in ("", ".", "..") for p in parts) and not {"\\", "\0"} & set(cfg.exp_name))
    require(inside, f"--exp_name must name a folder below runs/<project>/ (no '..', no leading '/'), got "
                    f"'{cfg.exp_name}'; use --run_dir for a path elsewhere")
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in shared and type(value) is int:
            require(value >= 1, f"--{f.name} must be at least 1, got {value}")


def schedule_warnings(cfg) -> list[str]:
    """Settings that train, but not as the user likely meant: a warm-up as long as the whole schedule."""
    if cfg.warmup_steps >= cfg.decay_steps:
        return [
            f"--warmup_steps {cfg.warmup_steps} is not below --decay_steps {cfg.decay_steps}: the learning rate "
            f"never reaches --max_lr {cfg.max_lr:g} (the preset's warm-up is meant for longer runs; lower "
            "--warmup_steps for a short one)"
        ]
    return []
