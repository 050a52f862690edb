"""The training loop shared by every project (docs/training.md, docs/architecture.md).

One optimiser step reads one global batch: this rank's streams split into M micro-batches. Each micro-step's
mean loss is divided by M and gradients are synchronised (DDP mean over W ranks) only on the last
micro-step, so W ranks x M micro-steps make the same update as 1 rank x W*M micro-steps. Stateful models
keep one state per micro-batch, carried from step to step and detached every step.

The hot path never waits for the device: losses are summed on the device and read only when a report
(metrics line, terminal line, checkpoint) is due; batches are copied from pinned memory without blocking,
so the host prepares the next batch while the device still works on the previous step.

SIGINT / SIGTERM ask the run to stop: it finishes the step under way (a validation under way stops before
its next batch, without a record), writes a checkpoint and returns the signal (train_command exits 128 +
signal). Checkpoints are also written every `ckpt_every_minutes` of wall time. Under torchrun the ranks
agree on both at every step boundary, and on a signal before every validation batch, with one small
all-reduce on the host (a gloo group), so the device is never waited for.

`--parallel fsdp` shards the model with torch's FSDP2 instead of replicating it with DDP, and
`--activation_checkpointing` recomputes each block's activations in the backward (languini/train_lib/
parallel.py). Checkpoints store what belongs to a stream by its global stream index, so a run resumes on
any number of processes and accumulation steps with the same global batch (`restore`).
"""

import contextlib
import os
import random
import reprlib
import shutil
import signal
import threading
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from languini.common_lib.config import config_to_dict
from languini.common_lib.device import autocast_context, configure_device
from languini.common_lib.errors import UserError
from languini.dataset_lib.languini_books import LanguiniDatasetIterator, stream_indices
from languini.train_lib import checkpoint as ckpt
from languini.train_lib.compile import compile_loss, compile_model
from languini.train_lib.distributed import (
    all_gather_objects,
    all_reduce_mean,
    all_reduce_sum,
    broadcast_object,
)
from languini.train_lib.eval_metrics import evaluate_on_loader
from languini.train_lib.optim import build_optimizer, build_scheduler
from languini.train_lib.parallel import (
    apply_activation_checkpointing,
    apply_fsdp,
    full_value,
    local_tensor,
    uses_fsdp,
)
from languini.train_lib.run_folder import checkpoint_path
from languini.train_lib.state import detach_state, map_state, relayout_states, state_to
from languini.train_lib.token_lengths import load_token_lengths

# Test hook (tests/test_parallel.py): SIGKILL this process after the sharded checkpoint of this step is
# written but before latest.pt names it, to show that the previous checkpoint stays loadable.
KILL_BEFORE_POINTER_ENV = "LANGUINI_TEST_KILL_BEFORE_POINTER_AT_STEP"


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the run stops without checkpointing the bad state."""


class ValidationAbandoned(Exception):
    """A signal came during a validation: every rank stopped it before the same batch."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def check_batch_layout(cfg, world_size: int):
    """The global batch must split evenly over W processes x M micro-steps (and eval over W processes)."""
    m = cfg.gradient_accumulation_steps
    if m < 1:
        raise UserError(f"--gradient_accumulation_steps must be at least 1, got {m}")
    if cfg.train_batch_size % (world_size * m):
        raise UserError(
            f"--train_batch_size {cfg.train_batch_size} must be divisible by processes x accumulation steps "
            f"= {world_size} x {m} = {world_size * m}"
        )
    if cfg.eval_every > 0 and cfg.eval_batch_size % world_size:
        raise UserError(
            f"--eval_batch_size {cfg.eval_batch_size} must be divisible by {world_size} processes"
        )


def make_loader(
    cfg, dataset_path, world, split: str, batch_size: int, micro_batches: int, repeat: bool, device="cpu"
):
    """This rank's stream loader. Training batches stay on the host: the trainer pins and copies them."""
    return LanguiniDatasetIterator(
        dataset_path,
        split,
        global_batch_size=batch_size,
        batch_idxs=stream_indices(world.rank, world.size, batch_size),
        micro_batches=micro_batches,
        sequence_length=cfg.seq_len,
        device=device,
        repeat=repeat,
    )


class Trainer:
    """Owns the model wrappers, optimiser, schedule, scaler, loader and states of one process."""

    def __init__(
        self, cfg, model, world, device, precision: str, dataset_path: str, run_dir: str, train_loader=None
    ):
        """`train_loader` replaces the stream loader of the dataset (benchmarks feed random tokens)."""
        self.cfg, self.world, self.device, self.precision = cfg, world, device, precision
        self.dataset_path, self.run_dir = dataset_path, run_dir
        self.raw_model = model  # checkpoints come from here: no DDP / compile prefixes
        self.fsdp = uses_fsdp(cfg, world)  # sharded (FSDP2); else replicated (DDP) or a single process
        self.autocast = lambda: autocast_context(precision, device)
        configure_device(device)

        if getattr(cfg, "activation_checkpointing", False):
            apply_activation_checkpointing(model)  # in place: names stay clean
        # in place: names stay clean; under FSDP the blocks' forward methods, so its hooks stay eager
        self.eval_model = compile_model(model, cfg.compile, hooks_outside=self.fsdp)
        self.loss_fn = compile_loss(cfg.compile)
        self.train_model = self.eval_model
        if self.fsdp:
            apply_fsdp(model, precision)  # parameters become DTensor shards: the optimiser comes after
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        if world.is_distributed and not self.fsdp:
            device_ids = [device.index] if device.type == "cuda" else None
            self.train_model = DistributedDataParallel(
                self.eval_model, device_ids=device_ids, gradient_as_bucket_view=True
            )

        self.token_lengths = load_token_lengths(dataset_path, cfg.vocab_size)  # None: no normalised metrics
        self.micro_batches = cfg.gradient_accumulation_steps
        self.loader = train_loader or make_loader(
            cfg, dataset_path, world, "train", cfg.train_batch_size, self.micro_batches, repeat=True
        )
        local_rows = cfg.train_batch_size // world.size // self.micro_batches
        self.states = [model.get_init_state(local_rows, device) for _ in range(self.micro_batches)]
        self.step = 0  # completed optimiser steps
        self.elapsed_before = 0.0  # training seconds of earlier sessions of this run (resume)
        self.corpus = None  # the corpus identity recorded in checkpoints (set by train_command)
        self.restored_corpus = None  # the corpus identity of the checkpoint restored, if it records one
        self.window = Window(self.step, device, world)  # losses since the last report (checkpointed)
        # the stop / wall-clock votes run on the host: a gloo group beside nccl (the default group on CPU)
        self.vote_group = None
        if world.is_distributed and dist.get_backend() != "gloo":
            self.vote_group = dist.new_group(backend="gloo")

    # ---- checkpoints -------------------------------------------------------------------------------------

    def save(self, path: str):
        """Gather every rank's loader / state / RNG and write one checkpoint from rank 0.

        A finite loss is computed before its update, so the weights are checked too: an update that made them
        NaN/inf (e.g. overflowing gradients) must not replace the last good checkpoint. DDP keeps the weights
        identical on every rank, so every rank reaches the same verdict.
        """
        weights_ok = torch.stack([local_tensor(p.detach()).isfinite().all() for p in self.raw_model.parameters()])
        bad = (~weights_ok.all()).float()
        if (all_reduce_sum(bad, self.world) if self.fsdp else bad).item() > 0:
            raise TrainingDiverged(
                f"the weights became NaN or infinite by step {self.step}; stopping without saving this state "
                "(the last good checkpoint is kept). Lower --max_lr or set --grad_clip_norm"
            )
        per_rank = all_gather_objects(
            {
                "loader": self.loader.state_dict(),
                "states": state_to(self.states, "cpu"),
                "rng": ckpt.rng_state(),
                "window": self.window.state_dict(),
            },
            self.world,
        )
        failure, sharded = None, None
        if self.fsdp:  # every process writes its shards into a fresh folder; latest.pt names it afterwards
            sharded = broadcast_object(f"step_{self.step:08d}.{uuid.uuid4().hex[:12]}.dcp", self.world)
            try:
                ckpt.save_sharded(os.path.join(os.path.dirname(path), sharded), self.raw_model, self.optimizer)
            except Exception as e:  # DCP reports a failure of any process on every process, after all wrote
                failure = (
                    f"cannot write the sharded checkpoint {sharded} beside {path}: {ckpt.first_line(e)}; the previous "
                    "checkpoint is intact (free space or fix the folder's permissions, then continue with "
                    "--resume auto)"
                )
                if self.world.is_main:  # the half-written folder would hold the space the user frees
                    shutil.rmtree(os.path.join(os.path.dirname(path), sharded), ignore_errors=True)
            if os.environ.get(KILL_BEFORE_POINTER_ENV) == str(self.step) and self.world.is_main:
                os.kill(os.getpid(), signal.SIGKILL)
        if self.world.is_main and failure is None:
            try:
                ckpt.save_checkpoint(
                    path,
                    {
                        "model": {} if sharded else self.raw_model.state_dict(),
                        "optimizer": {} if sharded else self.optimizer.state_dict(),
                        "sharded": sharded,
                        "parallel": "fsdp" if self.fsdp else "ddp",
                        "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict() if self.scaler else None,
                        "step": self.step,
                        "elapsed": self.elapsed(),
                        "config": config_to_dict(self.cfg),
                        "world_size": self.world.size,
                        "corpus": self.corpus,
                        "loader": [r["loader"] for r in per_rank],
                        "states": [r["states"] for r in per_rank],
                        "rng": [r["rng"] for r in per_rank],
                        "window": [r["window"] for r in per_rank],
                    },
                )
            except OSError as e:  # full disk, read-only folder: the atomic write left the old checkpoint
                failure = (
                    f"cannot write the checkpoint {path}: {e.strerror or e}; the previous checkpoint is intact "
                    "(free space or fix the folder's permissions, then continue with --resume auto)"
                )
            else:  # latest.pt names the new folder (or none): the older sharded folders can go
                ckpt.remove_sharded_folders(os.path.dirname(path), keep=sharded)
        failure = broadcast_object(failure, self.world)  # every rank stops together, or none does
        if failure:
            raise UserError(failure)
        self.last_save = time.monotonic()

    def restore(self, path: str):
        """Continue from a checkpoint (read safely); a file that does not fit this run is one UserError line.

        The global batch must be the one the checkpoint trained with; the number of processes, the
        accumulation steps and `--parallel` may differ: every global stream gets back its loader position
        and recurrent state, and weights and optimiser are resharded (a sharded checkpoint through DCP). The
        random generators of each process come back when the number of processes is unchanged; otherwise
        they are seeded from --seed and the rank (training draws no random numbers today).
        """
        checkpoint = ckpt.load_checkpoint(path)
        ckpt.check_training_checkpoint(checkpoint, path)
        saved_world, world = checkpoint["world_size"], self.world
        saved_batch = (checkpoint.get("config") or {}).get("train_batch_size", self.cfg.train_batch_size)
        if saved_batch != self.cfg.train_batch_size:
            raise UserError(
                f"{path} was trained with --train_batch_size {saved_batch}; resume it with the same global batch "
                "(processes and --gradient_accumulation_steps may change)"
            )
        step = checkpoint["step"]
        if step > self.cfg.max_train_steps:
            raise UserError(
                f"{path} is at step {step}, past --max_train_steps {self.cfg.max_train_steps}; continue it "
                f"with --max_train_steps {step} or more"
            )
        problem = _loader_states_problem(checkpoint["loader"], step, self.cfg.train_batch_size)
        if problem:
            raise UserError(f"{path} is damaged: its loader state {problem}")
        ckpt.check_scheduler_state(checkpoint["scheduler"], self.scheduler, path, step)
        same_layout = saved_world == world.size
        rank = world.rank
        part = "model"
        try:
            if checkpoint.get("sharded"):
                folder = ckpt.sharded_folder(path, checkpoint)
                ckpt.load_sharded(folder, path, self.raw_model, self.optimizer)
            elif self.fsdp:
                ckpt.load_full_into_sharded(checkpoint, path, self.raw_model, self.optimizer)
            else:
                ckpt.load_model_state(self.raw_model, checkpoint["model"], path)
                part = "optimizer"
                ckpt.check_optimizer_state(checkpoint, self.optimizer, path)
                self.optimizer.load_state_dict(checkpoint["optimizer"])
            part = "scheduler"
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            part = "scaler"
            if self.scaler is not None and checkpoint.get("scaler") is not None:
                self.scaler.load_state_dict(checkpoint["scaler"])
            part = "loader"
            self.loader.load_state_dict(_merge_loader_states(checkpoint["loader"]))
            part = "recurrent state"
            states = relayout_states(
                checkpoint["states"], self.cfg.train_batch_size, rank, world.size, self.micro_batches
            )
            if _shapes(states) != _shapes(self.states):
                raise ValueError("its shapes differ from this model's")
            self.states = state_to(states, self.device)
            part = "random generator"
            if same_layout:
                ckpt.set_rng_state(checkpoint["rng"][rank])
            else:
                _seed_everything(self.cfg.seed + 1 + rank)
            part = "loss window"
            windows = checkpoint.get("window")  # absent in checkpoints of older versions
            if windows is not None:
                self.window.load_state_dict(windows[rank] if same_layout else _merge_windows(windows))
        except UserError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            reason = ckpt.first_line(e)
            raise UserError(f"{path} does not fit this run: its {part} state cannot be restored ({reason})") from None
        self.step = step
        self.elapsed_before = float(checkpoint["elapsed"])
        self.restored_corpus = checkpoint.get("corpus")
        saved_m = len(checkpoint["states"][0]) if checkpoint["states"] else self.micro_batches
        self.restored_layout = (saved_world, saved_m, checkpoint.get("parallel", "ddp"))

    # ---- one step ----------------------------------------------------------------------------------------

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def train_step(self, want_norms: bool) -> tuple[torch.Tensor, dict]:
        """One optimiser step; returns this rank's mean loss (on the device) and norms when asked."""
        x, y, _ = next(self.loader)  # training streams wrap around: never padded
        x, y = self.to_device(x), self.to_device(y)
        loss_sum = torch.zeros((), device=self.device)
        for m in range(self.micro_batches):
            is_last = m == self.micro_batches - 1
            no_sync = self.world.is_distributed and not is_last and not self.fsdp
            if self.fsdp:  # gradients are reduce-scattered on the last micro-step only
                self.train_model.set_requires_gradient_sync(is_last)
            with self.train_model.no_sync() if no_sync else contextlib.nullcontext():
                with self.autocast():
                    logits, state = self.train_model(x[m], self.states[m])
                    loss = self.loss_fn(logits, y[m])
                scaled = loss / self.micro_batches
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            self.states[m] = detach_state(state)
            loss_sum += loss.detach()
        norms = self.optimizer_step(want_norms)
        self.step += 1
        return loss_sum / self.micro_batches, norms

    def optimizer_step(self, want_norms: bool) -> dict:
        cfg, params = self.cfg, [p for p in self.raw_model.parameters() if p.grad is not None]
        norms = {}
        if self.scaler is not None and (cfg.grad_clip_norm > 0 or want_norms):
            self.scaler.unscale_(self.optimizer)  # clip and report true gradients
        if cfg.grad_clip_norm > 0:
            norms["grad/norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
        elif want_norms:
            norms["grad/norm"] = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if want_norms:
            norms["grad/param_norm"] = torch.nn.utils.get_total_norm(list(self.raw_model.parameters()))
        return {k: full_value(v) for k, v in norms.items()} if want_norms else {}

    # ---- validation --------------------------------------------------------------------------------------

    def validate(self, interruption: "Interruption") -> dict:
        """Metrics on the iid test split from zero states (at most max_eval_steps batches), all ranks summed.

        Before each batch the ranks vote on a signal (`vote`), so that a signal stops a long validation at
        once, on every rank before the same batch and before any rank sums its results with the others:
        raises ValidationAbandoned.
        """
        cfg = self.cfg
        loader = make_loader(
            cfg,
            self.dataset_path,
            self.world,
            "test",
            cfg.eval_batch_size,
            1,
            repeat=False,
            device=self.device,
        )
        loader = _StopsOnSignal(loader, lambda: self.vote(interruption)[0])
        was_training = self.eval_model.training
        try:
            metrics = evaluate_on_loader(
                self.eval_model, loader, self.autocast, cfg.max_eval_steps, self.token_lengths, self.world
            )
        finally:  # an abandoned evaluation leaves the model in eval mode
            self.eval_model.train(was_training)
        return {f"eval/{k}": v for k, v in metrics.items() if v is not None}

    def _validate_into(self, record: dict, interruption: "Interruption", say) -> int:
        """Validate, add the metrics to `record` and print them; returns 0, or the signal that abandoned the
        validation (nothing is added then)."""
        try:
            eval_metrics = self.validate(interruption)
        except ValidationAbandoned as abandoned:
            return abandoned.signum
        record.update(eval_metrics)
        if self.world.is_main:
            say(f"step {self.step}: " + "  ".join(f"{k} {_fmt(v)}" for k, v in eval_metrics.items()))
        return 0

    # ---- the loop ----------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.session_start

    def vote(self, interruption: "Interruption") -> tuple[int, bool]:
        """(the signal to stop on, 0 for none; whether the wall-clock checkpoint is due), the same on every
        rank: any rank's signal stops all of them, and rank 0's clock decides the checkpoint."""
        minutes = self.cfg.ckpt_every_minutes
        clock_due = minutes > 0 and time.monotonic() - self.last_save >= 60 * minutes
        if not self.world.is_distributed:
            return interruption.signum, clock_due
        votes = torch.tensor([interruption.signum, int(clock_due and self.world.is_main)], dtype=torch.int64)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.vote_group)  # host tensors, host group
        return int(votes[0]), bool(votes[1])

    def run(self, logger) -> int:
        """Train from `self.step` to max_train_steps; `logger` (a MetricsLogger) receives the records.

        Returns 0, or the signal (SIGINT, SIGTERM) that stopped the run after a step and a checkpoint.
        """
        with Interruption(announce=self.world.is_main) as interruption:
            return self._run(logger, interruption)

    def _run(self, logger, interruption: "Interruption") -> int:
        cfg, world = self.cfg, self.world
        self.session_start = time.perf_counter()
        self.last_save = time.monotonic()
        bar = tqdm(
            total=cfg.max_train_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (world.is_main and cfg.progress_bar),
        )
        window = self.window
        window.restart(self.step)
        say = bar.write if not bar.disable else print
        try:
            while self.step < cfg.max_train_steps:
                lr = self.scheduler.get_last_lr()[0]  # the lr this step uses: lr_at_step(self.step)
                want_norms = _due(self.step + 1, cfg.log_grads_every)
                loss, norms = self.train_step(want_norms)
                window.add(loss)
                bar.update(1)
                done = self.step == cfg.max_train_steps
                stop, clock_due = self.vote(interruption)
                stop = 0 if done else stop  # a signal at the last step: the run is complete anyway
                record = {}
                if done or _due(self.step, cfg.log_metrics_every) or _due(self.step, cfg.log_terminal_every):
                    record = self.report(window, lr)
                    if world.is_main and (done or _due(self.step, cfg.log_terminal_every)):
                        say(_terminal_line(self.step, cfg.max_train_steps, record))
                        bar.set_postfix(loss=f"{record['train/loss']:.4f}", refresh=False)
                record.update({k: v.item() for k, v in norms.items()})
                pause_start = time.perf_counter()  # checkpoint and eval time stay out of tokens/s
                saved = done or stop or clock_due or _due(self.step, cfg.log_ckpt_every)
                validated = cfg.eval_every > 0 and not stop and (done or _due(self.step, cfg.eval_every))
                if saved or validated:
                    window.check_finite(self.step)  # never validate or checkpoint a diverged model
                if validated:
                    stop = self._validate_into(record, interruption, say)
                    saved = saved or bool(stop)  # a signal abandoned the validation: checkpoint this step now
                # the step's metrics line goes before its checkpoint: a crash between the two resumes from the
                # previous checkpoint, which drops the line and logs the step again; the other way round the
                # resumed run would start after the step and its line would be lost
                if record:
                    logger.log(self.step, self.elapsed(), record)
                if saved:
                    self.save(checkpoint_path(self.run_dir))
                window.exclude(time.perf_counter() - pause_start)
                if stop:
                    return stop
        finally:
            bar.close()
        return 0

    def report(self, window: "Window", lr: float) -> dict:
        """Mean train loss over the window (all ranks) and throughput; raises TrainingDiverged on NaN/inf."""
        window.check_finite(self.step)
        mean_loss = all_reduce_mean(window.loss_sum / window.steps, self.world).item()
        seconds = window.seconds()
        tokens = window.steps * self.cfg.train_batch_size * self.cfg.seq_len
        record = {
            "train/loss": mean_loss,
            "train/lr": lr,
            "time/tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
            "time/seconds_per_step": seconds / window.steps,
        }
        window.reset(self.step)
        return record


class Window:
    """Losses summed on the device since the last report, and the wall time they took.

    It is part of the checkpoint, so a run resumed between two reports logs the same mean loss as a run
    that was never stopped.
    """

    def __init__(self, step: int, device, world):
        self.device, self.world = device, world
        self.reset(step)

    def reset(self, step: int):
        self.first_step = step + 1
        self.steps = 0
        self.loss_sum = torch.zeros((), device=self.device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.restart(step)
        self.seconds_before = 0.0

    def restart(self, step: int):
        """Start the clock of a session (the losses of a restored window are kept)."""
        if self.steps == 0:
            self.first_step = step + 1
        self.start = time.perf_counter()
        self.excluded = 0.0

    def state_dict(self) -> dict:
        return {
            "first_step": self.first_step, "steps": self.steps, "loss_sum": self.loss_sum.detach().cpu(),
            "nonfinite": self.nonfinite.cpu(), "seconds": self.seconds(),
        }  # fmt: skip

    def load_state_dict(self, state: dict):
        self.first_step, self.steps = int(state["first_step"]), int(state["steps"])
        self.loss_sum = state["loss_sum"].to(self.device, torch.float32).reshape(())
        self.nonfinite = state["nonfinite"].to(self.device, torch.bool).reshape(())
        self.seconds_before = float(state["seconds"])

    def exclude(self, seconds: float):
        """Leave `seconds` (checkpointing, validation) out of the window's training time."""
        self.excluded += seconds

    def add(self, loss: torch.Tensor):
        self.steps += 1
        self.loss_sum += loss
        self.nonfinite |= ~torch.isfinite(loss)

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.start - self.excluded

    def check_finite(self, step: int):
        """Raise TrainingDiverged on every rank if any rank saw a NaN/inf loss since the last report."""
        if all_reduce_sum(self.nonfinite.float(), self.world).item() > 0:
            where = (
                f"at step {step}"
                if self.first_step >= step
                else f"between steps {self.first_step} and {step}"
            )
            raise TrainingDiverged(
                f"the training loss became NaN or infinite {where}; stopping without saving this state. "
                "Lower --max_lr, set --grad_clip_norm, or use --precision fp32/bf16"
            )


class Interruption:
    """SIGINT / SIGTERM handlers for the training loop: the first signal asks the loop to stop after the
    step under way (it checkpoints and returns the signal); a second one, a second or more later, ends the
    process at once with the signal's default action (exit status 128 + signal). A second signal within a
    second is the same interruption: torchrun forwards a Ctrl-C that its workers already received.
    The previous handlers are restored on exit; outside the main thread nothing is installed."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_AFTER_SECONDS = 1.0

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.signum = 0
        self.first_at = 0.0
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        now = time.monotonic()
        if not self.signum:
            self.signum, self.first_at = signum, now
            if self.announce:  # os.write: print() is not safe inside a signal handler
                os.write(2, (
                    f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
                    "(send it again to quit at once)\n"
                ).encode())  # fmt: skip
        elif now - self.first_at >= self.REPEAT_AFTER_SECONDS:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


class _StopsOnSignal:
    """Iterates over `loader`, first asking `voted_signal()` (a collective: every rank asks before the same
    batch) and raising ValidationAbandoned when it returns a signal."""

    def __init__(self, loader, voted_signal):
        self.loader, self.voted_signal = loader, voted_signal

    def __iter__(self):
        return self

    def __next__(self):
        signum = self.voted_signal()
        if signum:
            raise ValidationAbandoned(signum)
        return next(self.loader)


def _loader_states_problem(states: list, step: int, streams: int) -> str | None:
    """Why the saved loader states are not those the stream loaders write after `step` steps, or None.

    Each process's loader has read one window per step and records [stream, book, offset] for each of its
    streams; together they hold every one of the `streams` global streams once. (The loader itself then
    checks each position against the data.)
    """
    seen = []
    for rank, state in enumerate(states):
        if not isinstance(state, dict) or not isinstance(state.get("streams"), list):
            return f"of process {rank} is not a stream loader's state"
        if type(state.get("windows")) is not int or state["windows"] != step:
            return f"of process {rank} has read {reprlib.repr(state.get('windows'))} batches in {step} steps"
        for position in state["streams"]:
            if not (isinstance(position, list) and len(position) == 3 and all(_natural(x) for x in position)):
                where = reprlib.repr(position)
                return f"of process {rank} has a stream position {where}, not [stream, book, offset]"
            seen.append(position[0])
    if sorted(seen) != list(range(streams)):
        return f"holds positions of streams {reprlib.repr(sorted(seen))}, not of each of the {streams} once"
    return None


def _natural(value) -> bool:
    return type(value) is int and value >= 0


def _merge_loader_states(states: list) -> dict:
    """One loader state holding the stream positions every process saved (it loads on any layout)."""
    merged = dict(states[0])
    merged["streams"] = [stream for state in states for stream in state["streams"]]
    return merged


def _merge_windows(windows: list) -> dict:
    """The loss window for a process of another layout: the mean of the saved processes' loss sums (the
    report averages over processes, so the logged mean stays the same), any NaN seen, rank 0's clock."""
    merged = dict(windows[0])
    merged["loss_sum"] = torch.stack([w["loss_sum"].float().reshape(()) for w in windows]).mean()
    merged["nonfinite"] = torch.stack([w["nonfinite"].bool().reshape(()) for w in windows]).any()
    return merged


def _seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _shapes(state) -> list:
    """The shapes of a nested state's tensors, in order (its structure, for comparing two states)."""
    shapes = []
    map_state(state, lambda t: shapes.append(tuple(t.shape)))
    return shapes


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _terminal_line(step: int, total: int, record: dict) -> str:
    return (
        f"step {step}/{total}  loss {record['train/loss']:.4f}  lr {record['train/lr']:.2e}  "
        f"{record['time/tokens_per_second']:,.0f} tok/s"
    )


def _fmt(value) -> str:
    """Counts as integers with thousands separators, rates with four decimals."""
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"
