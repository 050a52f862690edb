"""`run_training(spec, argv)`: what every project's main.py calls (through languini.projects.commands).

Works as one plain process (`python main.py PRESET --flags`) or as one of many under torchrun; parses the
config, checks the data and the batch layout before touching anything, claims the run folder, builds the
model and trains (resuming from the folder's checkpoint with `--resume auto`).
"""

import os
import sys

import torch

from languini.common_lib.config import config_to_dict, format_config
from languini.common_lib.device import device_name, resolve_device, resolve_precision
from languini.common_lib.errors import UserError
from languini.dataset_lib.layout import check_dataset, read_books
from languini.train_lib import run_folder
from languini.train_lib.distributed import (
    broadcast_object,
    init_distributed,
    shutdown_distributed,
    world_from_env,
)
from languini.train_lib.loggers import MetricsLogger, check_sinks, truncate_metrics
from languini.train_lib.project_spec import ProjectSpec
from languini.train_lib.train_config import check_config
from languini.train_lib.trainer import Trainer, TrainingDiverged, check_batch_layout


def run_training(spec: ProjectSpec, argv: list[str]) -> int:
    """Train the project's model with the config parsed from `argv` (`[PRESET] [--flags]`); returns the
    exit code."""
    world = world_from_env()
    prog = os.path.basename(sys.argv[0]) or "main.py"
    try:
        cfg = spec.parse_config(list(argv), prog)
        return _train(cfg, spec.Model, world, list(argv))
    except UserError:
        if world.is_main:
            raise  # printed once, as one line, by exit_on_user_error
        return 2
    except TrainingDiverged as e:
        if world.is_main:
            print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()


def _train(cfg, Model, world, argv: list[str]) -> int:
    check_config(cfg)
    check_model_builds(Model, cfg)
    dataset_path = check_dataset(cfg.data_root, cfg.dataset, cfg.vocab_size)
    if cfg.eval_every > 0:
        read_books(dataset_path, "test")  # validation needs the iid test split: fail now, not at its first use
    check_batch_layout(cfg, world.size)
    check_sinks(cfg.logger_type)
    device = resolve_device(cfg.device, world.local_rank)
    precision = resolve_precision(cfg.precision, device)
    init_distributed(world, device)

    run_dir = run_folder.resolve_run_dir(cfg)
    resume = _claim_on_main(run_dir, cfg, world)
    if world.is_main:
        print(
            f"{'resuming' if resume else 'training'} {cfg.project} in {run_dir} on {world.size} x "
            f"{device_name(device)} ({precision})\n{format_config(cfg)}"
        )
        env = run_folder.environment(device_name(device), world.size, argv)
        run_folder.write_run_files(run_dir, cfg, env, resumed=resume)

    torch.manual_seed(cfg.seed)
    model = Model(cfg).to(device)
    trainer = Trainer(cfg, model, world, device, precision, dataset_path, run_dir)
    if resume:
        trainer.restore(run_folder.checkpoint_path(run_dir))
        if world.is_main:
            truncate_metrics(run_dir, trainer.step)
            print(f"resumed at step {trainer.step}")
    else:
        torch.manual_seed(cfg.seed + 1 + world.rank)  # per-rank randomness during training, if any
    logger = MetricsLogger(run_dir, cfg, config_to_dict(cfg), world.is_main, trainer.step)
    try:
        trainer.run(logger)
    finally:
        logger.close()
    if world.is_main:
        print(f"done: {trainer.step} steps; metrics and checkpoint in {run_dir}")
    return 0


def _claim_on_main(run_dir: str, cfg, world) -> bool:
    """Rank 0 checks / prepares the folder; every rank learns the outcome (or raises the same error)."""
    outcome = None
    if world.is_main:
        try:
            resume = run_folder.claim_run_dir(run_dir, cfg.resume, cfg.overwrite)
            if resume:
                run_folder.check_resume_config(run_dir, cfg)
            outcome = ("ok", resume)
        except UserError as e:
            outcome = ("error", str(e))
    outcome = broadcast_object(outcome, world)
    if outcome[0] == "error":
        raise UserError(outcome[1])
    return outcome[1]


def check_model_builds(Model, cfg):
    """Build the model on the meta device (no memory): a config it rejects fails before any folder exists."""
    try:
        with torch.device("meta"):
            Model(cfg)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"the model cannot be built from this config: {e}") from None
