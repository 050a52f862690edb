"""Measure training throughput: `languini throughput PROJECT [PRESET] [--flags]` (also run as
`python3 languini/common_lib/throughput.py ...`).

Times full training steps (forward under the precision's autocast, `lm_loss`, backward, optimiser step)
on random tokens, after warm-up, with the device synchronised around each step. Reports parameters,
tokens/s, step time, peak memory, FLOPs per token (torch.utils.flop_counter), achieved TFLOP/s, MFU and
the training steps of each compute class at the measured throughput. `--json FILE` writes it all.

The project's config flags all work (`--train_batch_size 8 --precision bf16 --compile default ...`);
`train_batch_size` sequences make one optimiser step, in `gradient_accumulation_steps` micro-batches.
"""

import resource
import statistics
import sys
import time

import torch
from tqdm import tqdm

from languini.common_lib import hardware
from languini.common_lib.atomic_io import atomic_write_json
from languini.common_lib.device import (
    device_name,
    resolve_device,
    resolve_precision,
    synchronize,
)
from languini.common_lib.errors import exit_on_user_error
from languini.tools.compute_classes import REFERENCE_GPU, THROUGHPUT_CLASS_HOURS, steps_for
from languini.tools.flops import build_model, count_step_flops, param_counts
from languini.tools.tool_args import parse_tool_args
from languini.train_lib.distributed import World
from languini.train_lib.random_batches import RandomBatches
from languini.train_lib.trainer import Trainer, check_batch_layout

OOM_EXIT_CODE = 3  # the sweep reads this as "did not fit"

THROUGHPUT_FLAGS = {
    "json": (str, "", "also write the results to this JSON file"),
    "steps": (int, 0, "timed steps (0 = auto: at least 10 steps and 3 seconds, at most 100 steps)"),
    "warmup": (int, -1, "untimed warm-up steps (-1 = auto: 3, or 8 with --compile)"),
    "peak_tflops": (float, 0.0, "peak TFLOP/s of the device for MFU (0 = the built-in table)"),
}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _timed_steps(step_fn, device, steps: int, warmup: int, progress: bool) -> list[float]:
    """Run `warmup` untimed steps, then timed ones; seconds per step. steps=0: at least 10 steps and 3 s."""
    for _ in tqdm(range(warmup), desc="warm-up", unit="step", disable=not progress, leave=False):
        step_fn()
    synchronize(device)
    times: list[float] = []
    bar = tqdm(total=steps or None, desc="timing", unit="step", disable=not progress, leave=False)
    while (steps and len(times) < steps) or (not steps and (len(times) < 10 or sum(times) < 3.0) and len(times) < 100):
        start = time.perf_counter()
        step_fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        bar.update()
    bar.close()
    return times


def measure(project: str, cfg, steps: int = 0, warmup: int = -1, peak_tflops: float = 0.0, progress: bool = True):
    """Time the trainer's own training step (`Trainer.train_step`: accumulation, autocast, compile, fused Adam,
    pinned non-blocking copies) on random tokens; returns the results as a JSON-able dict."""
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    check_batch_layout(cfg, 1)
    accumulation = cfg.gradient_accumulation_steps
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    model = build_model(project, cfg, device)
    total_params, non_embedding_params = param_counts(model, cfg.vocab_size)
    trainer = Trainer(cfg, model, World(), device, precision, "", "", train_loader=RandomBatches(cfg))

    def train_step():
        trainer.train_step(want_norms=False)

    warmup = warmup if warmup >= 0 else (8 if cfg.compile != "none" else 3)
    times = _timed_steps(train_step, device, steps, warmup, progress)

    step_s = statistics.median(times)
    tokens_per_step = cfg.train_batch_size * cfg.seq_len
    tokens_per_second = tokens_per_step / step_s
    flops = count_step_flops(project, cfg)
    achieved_tflops = flops.forward_backward_per_token * tokens_per_second / 1e12
    name = device_name(device)
    peak = peak_tflops or hardware.peak_tflops(name)
    return {
        "project": project,
        "preset": cfg.preset,
        "device": name,
        "torch_version": torch.__version__,
        "precision": precision,
        "compile": cfg.compile,
        "train_batch_size": cfg.train_batch_size,
        "gradient_accumulation_steps": accumulation,
        "seq_len": cfg.seq_len,
        "params_total": total_params,
        "params_non_embedding": non_embedding_params,
        "tokens_per_step": tokens_per_step,
        "warmup_steps": warmup,
        "timed_steps": len(times),
        "step_ms_median": step_s * 1e3,
        "step_ms_std": statistics.stdev(times) * 1e3 if len(times) > 1 else 0.0,
        "tokens_per_second": tokens_per_second,
        "peak_memory_mb": _peak_memory_mb(device),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS",
        "flops_per_token": flops.forward_backward_per_token,
        "forward_flops_per_token": flops.forward_per_token,
        "achieved_tflops": achieved_tflops,
        "peak_tflops": peak,
        "mfu": hardware.mfu(achieved_tflops, peak),
        "compute_class_steps": {
            str(h): steps_for(h, tokens_per_second, cfg.train_batch_size, cfg.seq_len) for h in THROUGHPUT_CLASS_HOURS
        },
        "oom": False,
    }


def format_results(r: dict) -> str:
    """The human-readable report of `measure`."""
    mfu = f"{r['mfu']:.1%} of {r['peak_tflops']:g} TFLOP/s" if r["mfu"] is not None else "unknown device peak (--peak_tflops)"
    lines = [
        f"device                {r['device']} (torch {r['torch_version']}, {r['precision']}, compile {r['compile']})",
        f"parameters            {r['params_total']:,} total, {r['params_non_embedding']:,} non-embedding",
        f"batch                 {r['train_batch_size']} x {r['seq_len']} = {r['tokens_per_step']:,} tokens per step "
        f"({r['gradient_accumulation_steps']} micro-step(s))",
        f"step time             {r['step_ms_median']:.2f} ms median, {r['step_ms_std']:.2f} ms std "
        f"over {r['timed_steps']} steps ({r['warmup_steps']} warm-up)",
        f"throughput            {r['tokens_per_second']:,.0f} tokens/s",
        f"peak memory           {r['peak_memory_mb']:,.0f} MB ({r['peak_memory_kind']})",
        f"FLOPs per token       {r['flops_per_token']:.4g} fwd+bwd ({r['forward_flops_per_token']:.4g} fwd)",
        f"achieved              {r['achieved_tflops']:.3f} TFLOP/s, MFU {mfu}",
        "",
        "steps per compute class at this throughput and batch size:",
    ]
    lines += [f"  {h:>3}h  {s:>9,}" for h, s in r["compute_class_steps"].items()]
    if REFERENCE_GPU not in r["device"]:
        lines.append(f"(compute classes are defined on an {REFERENCE_GPU}; see `languini steps --calibrate`)")
    return "\n".join(lines)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


@exit_on_user_error
def main(argv=None):
    usage = "throughput.py PROJECT [PRESET] [--config flags] [--json FILE] [--steps N] [--warmup N] [--peak_tflops F]"
    project, cfg, opts = parse_tool_args(sys.argv[1:] if argv is None else argv, usage, THROUGHPUT_FLAGS)
    try:
        results = measure(project, cfg, opts.steps, opts.warmup, opts.peak_tflops)
    except RuntimeError as e:
        if not _is_oom(e):
            raise
        results = {"project": project, "preset": cfg.preset, "train_batch_size": cfg.train_batch_size, "oom": True}
        if opts.json:
            atomic_write_json(opts.json, results)
        print(f"out of memory at train_batch_size {cfg.train_batch_size}", file=sys.stderr)
        return OOM_EXIT_CODE
    print(format_results(results))
    if opts.json:
        atomic_write_json(opts.json, results)
        print(f"wrote {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
