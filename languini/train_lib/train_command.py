"""`run_training(spec, argv)`: what every project's main.py calls (through languini.projects.commands).

Works as one plain process (`python main.py PRESET --flags`) or as one of many under torchrun; parses the
config, checks the data, the batch layout and the memory a step needs before touching anything, locks and
claims the run folder (rank 0 holds the lock until the run ends), checks that a resumed run keeps its
config and corpus, builds the model and trains (resuming from the folder's checkpoint with `--resume auto`).
SIGINT / SIGTERM stop the run after a checkpoint with exit code 130 / 143 (128 + signal).
"""

import contextlib
import os
import signal
import sys

import torch

from languini.common_lib.config import config_to_dict, format_config
from languini.common_lib.device import device_name, resolve_device, resolve_precision
from languini.common_lib.errors import UserError
from languini.common_lib.file_lock import exclusive_lock
from languini.dataset_lib.layout import check_dataset, corpus_identity, read_books
from languini.train_lib import run_folder
from languini.train_lib.distributed import (
    broadcast_object,
    init_distributed,
    shutdown_distributed,
    world_from_env,
)
from languini.train_lib.loggers import MetricsLogger, check_sinks, truncate_metrics
from languini.train_lib.parallel import check_parallel_config
from languini.train_lib.project_spec import ProjectSpec
from languini.train_lib.train_config import check_config, schedule_warnings
from languini.train_lib.trainer import Trainer, TrainingDiverged, check_batch_layout


def run_training(spec: ProjectSpec, argv: list[str], prog: str = "") -> int:
    """Train the project's model with the config parsed from `argv` (`[PRESET] [--flags]`); returns the
    exit code. `prog` names the command in --help (default: the script's name)."""
    world = world_from_env()
    prog = prog or os.path.basename(sys.argv[0]) or "main.py"
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
    except BrokenPipeError:
        raise  # stdout's reader went away (`| head`): the entry point ends quietly
    except OSError as e:  # the disk filled up, the folder became read-only, ... while training
        if world.is_main:
            where = f" ({e.filename})" if e.filename else ""
            raise UserError(f"training stopped: {e.strerror or e}{where}") from None
        return 2
    finally:
        shutdown_distributed()


def _train(cfg, Model, world, argv: list[str]) -> int:
    check_config(cfg)
    for warning in schedule_warnings(cfg) if world.is_main else []:
        print(f"warning: {warning}", file=sys.stderr)
    check_model_builds(Model, cfg)
    dataset_path = check_dataset(cfg.data_root, cfg.dataset, cfg.vocab_size)
    if cfg.eval_every > 0:
        read_books(dataset_path, "test")  # validation needs the iid test split: fail now, not at its first use
    check_batch_layout(cfg, world.size)
    check_parallel_config(cfg, world.size)
    check_sinks(cfg.logger_type)
    device = resolve_device(cfg.device, world.local_rank)
    precision = resolve_precision(cfg.precision, device)
    init_distributed(world, device)
    check_memory(Model, cfg, world, device)  # after init: on CUDA, asks this rank's own device

    run_dir = run_folder.resolve_run_dir(cfg)
    corpus = corpus_identity(dataset_path) if world.is_main else None
    with contextlib.ExitStack() as held:  # rank 0's lock on the run folder, until the run ends
        resume = _claim_on_main(run_dir, cfg, world, corpus, held)
        return _train_in_folder(cfg, Model, world, argv, run_dir, dataset_path, device, precision, resume, corpus)


def _train_in_folder(cfg, Model, world, argv, run_dir, dataset_path, device, precision, resume, corpus) -> int:
    if world.is_main:
        print(
            f"{'resuming' if resume else 'training'} {cfg.project} in {run_dir} on {world.size} x "
            f"{device_name(device)} ({precision})\n{format_config(cfg)}"
        )
        env = run_folder.environment(device_name(device), world.size, argv)
        run_folder.write_run_files(run_dir, cfg, env, resumed=resume)
        if run_folder.read_corpus(run_dir) is None:
            run_folder.write_corpus(run_dir, cfg.dataset, corpus)

    torch.manual_seed(cfg.seed)
    model = Model(cfg).to(device)
    trainer = Trainer(cfg, model, world, device, precision, dataset_path, run_dir)
    trainer.corpus = corpus
    if resume:
        trainer.restore(run_folder.checkpoint_path(run_dir))
        problem = _checkpoint_corpus_problem(trainer.restored_corpus, corpus) if world.is_main else None
        problem = broadcast_object(problem, world)
        if problem:
            raise UserError(f"{run_folder.checkpoint_path(run_dir)} {problem}")
        if world.is_main:
            truncate_metrics(run_dir, trainer.step)
            print(f"resumed at step {trainer.step}")
            saved_world, saved_m, saved_parallel = trainer.restored_layout
            if (saved_world, saved_m) != (world.size, cfg.gradient_accumulation_steps):
                print(
                    f"note: the checkpoint was written by {saved_world} process(es) x {saved_m} micro-step(s) "
                    f"({saved_parallel}); every stream continues where it stopped on {world.size} x "
                    f"{cfg.gradient_accumulation_steps}"
                    + ("" if saved_world == world.size else "; random generators are seeded from --seed and the rank")
                )
    else:
        torch.manual_seed(cfg.seed + 1 + world.rank)  # per-rank randomness during training, if any
    logger = MetricsLogger(run_dir, cfg, config_to_dict(cfg), world.is_main, trainer.step)
    try:
        stopped_by = trainer.run(logger)
    finally:
        logger.close()
    if stopped_by:
        if world.is_main:
            print(
                f"stopped by {signal.Signals(stopped_by).name} after step {trainer.step}; checkpoint written to "
                f"{run_folder.checkpoint_path(run_dir)}\ncontinue with the same command and "
                f"--resume auto --run_dir {run_dir}",
                flush=True,
            )
        return 128 + stopped_by
    if world.is_main:
        print(f"done: {trainer.step} steps; metrics and checkpoint in {run_dir}")
    return 0


def _claim_on_main(run_dir: str, cfg, world, corpus: dict | None, held: contextlib.ExitStack) -> bool:
    """Rank 0 locks the folder (held until `held` closes), checks and prepares it; every rank learns the
    outcome (or raises the same error). A refused folder is left exactly as it was (the lock file aside)."""
    outcome = None
    if world.is_main:
        try:
            held.enter_context(exclusive_lock(run_dir, "run folder"))
            resume = run_folder.claim_run_dir(run_dir, cfg.resume, cfg.overwrite)
            if resume:
                run_folder.check_resume_config(run_dir, cfg)
                _check_resume_corpus(run_dir, cfg, corpus)
            outcome = ("ok", resume)
        except UserError as e:
            outcome = ("error", str(e))
        except OSError as e:
            outcome = ("error", f"cannot write to the run folder {run_dir}: {e.strerror or e}")
    outcome = broadcast_object(outcome, world)
    if outcome[0] == "error":
        raise UserError(outcome[1])
    return outcome[1]


def _check_resume_corpus(run_dir: str, cfg, corpus: dict):
    """A resumed run keeps its corpus; a run from before corpus identities were recorded gets a warning."""
    recorded = run_folder.read_corpus(run_dir)
    if recorded is None:
        print(
            f"warning: {run_dir} records no corpus identity (an older run); cannot check that "
            f"{cfg.dataset} is the corpus it trained on",
            file=sys.stderr,
        )
        return
    differs = run_folder.corpus_differences(recorded, corpus)
    if differs:
        raise UserError(
            f"{run_dir} was trained on another corpus: the {' and '.join(differs)} of "
            f"{os.path.join(cfg.data_root, cfg.dataset)} differ from those it recorded; resume it on its own data"
        )


def _checkpoint_corpus_problem(recorded: dict | None, corpus: dict) -> str | None:
    """Why a checkpoint's recorded corpus is not this one (None when it is, or when it records none)."""
    if not isinstance(recorded, dict):
        return None
    differs = run_folder.corpus_differences(recorded, corpus)
    return f"was trained on another corpus (its {' and '.join(differs)} differ)" if differs else None


def check_memory(Model, cfg, world, device):
    """Refuse a config whose training step cannot fit in memory, before anything is allocated.

    A lower bound, so it never refuses a step that would fit: 16 bytes per parameter (fp32 weights,
    gradients and Adam's two moments; divided by the processes under --parallel fsdp) plus the fp32 logits of one micro-batch and their gradient (rows x
    seq_len x vocab_size x 8 bytes); compared with the device's memory (CPU: the machine's RAM).
    """
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Model(cfg).parameters())
    rows = max(1, cfg.train_batch_size // (world.size * cfg.gradient_accumulation_steps))
    shards = world.size if getattr(cfg, "parallel", "ddp") == "fsdp" else 1  # FSDP: each process holds 1/W
    needed = 16 * n_params // shards + 8 * rows * cfg.seq_len * cfg.vocab_size
    available = device_memory(device)
    if available and needed > available:
        raise UserError(
            f"a training step needs at least {needed / 2**30:,.1f} GiB ({n_params:,} parameters x 16 bytes, plus "
            f"logits of {rows} x {cfg.seq_len:,} tokens x {cfg.vocab_size:,} ids x 8 bytes) but the {device.type} "
            f"has {available / 2**30:,.1f} GiB; lower --seq_len or --train_batch_size, or raise "
            "--gradient_accumulation_steps"
        )


def device_memory(device) -> int | None:
    """Bytes of memory of `device` (CPU: physical RAM), or None when unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None


def check_model_builds(Model, cfg):
    """Build the model on the meta device (no memory): a config it rejects fails before any folder exists."""
    try:
        with torch.device("meta"):
            Model(cfg)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"the model cannot be built from this config: {e}") from None
