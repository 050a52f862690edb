"""Measure training throughput: `languini throughput PROJECT [PRESET] [--flags]` (also run as
`python3 languini/common_lib/throughput.py ...`).

Times full training steps (forward under the precision's autocast, `lm_loss`, backward, optimiser step)
on random tokens, after warm-up. Steps run in groups with the device synchronised only between groups,
as in training, where the host prepares the next batch while the device works: a group of k steps takes
time T, one step T / k; the median over the groups is the step time, their spread the noise. Reports
parameters, tokens/s, step time, peak memory, FLOPs per token (torch.utils.flop_counter), achieved
TFLOP/s, MFU (attention counted over the full T x T matrix, and with causal attention as half of it) and
the training steps of each compute class at the measured throughput. `--json FILE` writes it all.

The project's config flags all work (`--train_batch_size 8 --precision bf16 --compile default ...`);
`train_batch_size` sequences make one optimiser step, in `gradient_accumulation_steps` micro-batches.
"""

import math
import re
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
from languini.common_lib.errors import UserError, exit_on_user_error
from languini.tools.compute_classes import (
    REFERENCE_GPU,
    THROUGHPUT_CLASS_HOURS,
    reference_tokens_per_second,
    steps_for,
)
from languini.tools.flops import build_model, count_step_flops, param_counts
from languini.tools.tool_args import parse_tool_args
from languini.train_lib.distributed import World
from languini.train_lib.random_batches import RandomBatches
from languini.train_lib.trainer import Trainer, check_batch_layout

OOM_EXIT_CODE = 3  # the sweep reads this as "did not fit"

THROUGHPUT_FLAGS = {
    "json": (str, "", "also write the results to this JSON file"),
    "steps": (int, 0, "timed steps (0 = auto: about 3 seconds, 10 to 100 steps on a GPU, 3 to 20 on CPU)"),
    "warmup": (int, -1, "untimed warm-up steps (-1 = auto: 3, or 8 with --compile; on CPU 1, or 2)"),
    "peak_tflops": (float, 0.0, "peak TFLOP/s of the device for MFU (0 = the built-in table)"),
}

AUTO_SECONDS = 3.0  # --steps 0: time about this long
AUTO_STEPS = {"cuda": (10, 100), "cpu": (3, 20)}  # --steps 0: (fewest, most) timed steps
TIMING_GROUPS = 5  # the timed steps run in this many groups, the device synchronised between groups
ATTENTION_CONVENTION = (
    "mfu, achieved_tflops, flops_per_token: attention's score and AV products over the full T x T matrix; "
    "*_causal: causal attention counted as half of them"
)

# Out-of-memory as the CUDA libraries report it: the caching allocator's OutOfMemoryError, the runtime's
# "out of memory", and cuBLAS/cuDNN (and the other CUDA libraries) failing to get their workspace.
_OOM_PATTERN = re.compile(
    r"out of memory|CU[A-Z]+_STATUS_ALLOC_FAILED|cuDNN error:.*ALLOC",
    re.IGNORECASE,
)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def group_sizes(steps: int, groups: int = TIMING_GROUPS) -> list[int]:
    """`steps` timed steps split into at most `groups` groups whose sizes differ by at most one."""
    groups = max(1, min(groups, steps))
    return [steps // groups + (i < steps % groups) for i in range(groups)]


def auto_steps(step_seconds: float | None, device_type: str) -> int:
    """Timed steps for --steps 0: about AUTO_SECONDS of steps, within the device's AUTO_STEPS bounds."""
    fewest, most = AUTO_STEPS.get(device_type, AUTO_STEPS["cuda"])
    if not step_seconds:
        return fewest
    return max(fewest, min(most, math.ceil(AUTO_SECONDS / step_seconds)))


def _say_estimate(steps: int, step_seconds: float | None, device, fixed: bool):
    """On CPU (or a slow GPU step), how long the timing will take and how to shorten it."""
    if step_seconds is None or (device.type != "cpu" and steps * step_seconds < 30):
        return
    hint = "" if steps <= 1 else f"; --steps {max(1, steps // 3)} shortens it"
    how = "" if fixed else " (auto)"
    print(
        f"timing {steps} steps{how}: about {steps * step_seconds:.0f} s at {step_seconds:.2f} s per warm-up step{hint}",
        file=sys.stderr,
        flush=True,
    )


def _timed_steps(step_fn, device, steps: int, warmup: int, progress: bool) -> list[tuple[int, float]]:
    """Run `warmup` untimed steps, then the timed ones in groups; (steps, seconds) per group.

    The device is synchronised before and after each group only, so inside a group the host prepares
    (creates, pins, copies) the next batch while the device still works, as in training. steps=0: about
    AUTO_SECONDS of steps, counted from the last warm-up step's time."""
    step_seconds = None
    for i in tqdm(range(warmup), desc="warm-up", unit="step", disable=not progress, leave=False):
        if i == warmup - 1:
            synchronize(device)
            start = time.perf_counter()
        step_fn()
    synchronize(device)
    if warmup:
        step_seconds = time.perf_counter() - start
    total = steps or auto_steps(step_seconds, device.type)
    _say_estimate(total, step_seconds, device, fixed=bool(steps))
    groups: list[tuple[int, float]] = []
    bar = tqdm(total=total, desc="timing", unit="step", disable=not progress, leave=False)
    for size in group_sizes(total):
        start = time.perf_counter()
        for _ in range(size):
            step_fn()
        synchronize(device)
        groups.append((size, time.perf_counter() - start))
        bar.update(size)
    bar.close()
    return groups


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

    if warmup < 0:
        compiled = cfg.compile != "none"
        warmup = (2 if compiled else 1) if device.type == "cpu" else (8 if compiled else 3)
    groups = _timed_steps(train_step, device, steps, warmup, progress)

    per_step = [seconds / size for size, seconds in groups]  # one figure per group
    step_s = statistics.median(per_step)
    timed_steps = sum(size for size, _ in groups)
    tokens_per_step = cfg.train_batch_size * cfg.seq_len
    tokens_per_second = tokens_per_step / step_s
    flops = count_step_flops(project, cfg)
    achieved_tflops = flops.forward_backward_per_token * tokens_per_second / 1e12
    achieved_causal = flops.forward_backward_per_token_causal * tokens_per_second / 1e12
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
        "timed_steps": timed_steps,
        "timed_groups": len(groups),
        "steps_per_group": [size for size, _ in groups],
        "step_ms_median": step_s * 1e3,  # median over the groups of (group time / its steps)
        "step_ms_std": statistics.stdev(per_step) * 1e3 if len(per_step) > 1 else 0.0,
        "step_ms_mean": sum(seconds for _, seconds in groups) / timed_steps * 1e3,
        "step_ms_groups": [t * 1e3 for t in per_step],
        "tokens_per_second": tokens_per_second,
        "peak_memory_mb": _peak_memory_mb(device),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS",
        "attention_flops_convention": ATTENTION_CONVENTION,
        "flops_per_token": flops.forward_backward_per_token,
        "forward_flops_per_token": flops.forward_per_token,
        "flops_per_token_causal": flops.forward_backward_per_token_causal,
        "forward_flops_per_token_causal": flops.forward_per_token_causal,
        "achieved_tflops": achieved_tflops,
        "achieved_tflops_causal": achieved_causal,
        "peak_tflops": peak,
        "mfu": hardware.mfu(achieved_tflops, peak),
        "mfu_causal_attention": hardware.mfu(achieved_causal, peak),
        "compute_class_steps": {
            str(h): steps_for(h, tokens_per_second, cfg.train_batch_size, cfg.seq_len) for h in THROUGHPUT_CLASS_HOURS
        },
        "rtx3090_tokens_per_second": reference_tokens_per_second(project, cfg.preset),
        "oom": False,
    }


def format_results(r: dict) -> str:
    """The human-readable report of `measure`."""
    if r["mfu"] is not None:
        mfu = f"{r['mfu']:.1%} of {r['peak_tflops']:g} TFLOP/s"
        if r["precision"] == "fp32":
            mfu += " (a 16-bit tensor-core peak: an fp32/TF32 run cannot reach it)"
    else:
        mfu = "unknown device peak (--peak_tflops)"
    causal = r["flops_per_token_causal"] != r["flops_per_token"]
    lines = [
        f"device                {r['device']} (torch {r['torch_version']}, {r['precision']}, compile {r['compile']})",
        f"parameters            {r['params_total']:,} total, {r['params_non_embedding']:,} non-embedding",
        f"batch                 {r['train_batch_size']} x {r['seq_len']} = {r['tokens_per_step']:,} tokens per step "
        f"({r['gradient_accumulation_steps']} micro-step(s))",
        f"step time             {r['step_ms_median']:.2f} ms median, {r['step_ms_std']:.2f} ms std over "
        f"{r['timed_groups']} groups, {r['timed_steps']} steps ({r['warmup_steps']} warm-up)",
        f"throughput            {r['tokens_per_second']:,.0f} tokens/s",
        f"peak memory           {r['peak_memory_mb']:,.0f} MB ({r['peak_memory_kind']})",
        f"FLOPs per token       {r['flops_per_token']:.4g} fwd+bwd ({r['forward_flops_per_token']:.4g} fwd), "
        "attention over the full T x T matrix",
        f"achieved              {r['achieved_tflops']:.3f} TFLOP/s, MFU {mfu}",
    ]
    if causal:
        mfu_causal = f", MFU {r['mfu_causal_attention']:.1%}" if r["mfu_causal_attention"] is not None else ""
        lines += [
            f"causal attention      {r['flops_per_token_causal']:.4g} FLOPs per token fwd+bwd (attention products "
            f"halved): {r['achieved_tflops_causal']:.3f} TFLOP/s{mfu_causal}",
        ]
    lines += [
        "",
        "steps per compute class at this throughput and batch size:",
    ]
    lines += [f"  {h:>3}h  {s:>9,}" for h, s in r["compute_class_steps"].items()]
    if REFERENCE_GPU not in r["device"]:
        lines.append(f"(compute classes are defined on an {REFERENCE_GPU}; see `languini steps --calibrate`)")
    return "\n".join(lines)


def is_oom_text(text: str) -> bool:
    """Whether an error message (or a failed process's output) says the device ran out of memory."""
    return bool(_OOM_PATTERN.search(text or ""))


def is_oom(error: BaseException) -> bool:
    """Out of memory, also when cuBLAS/cuDNN could not allocate their workspace near the memory limit, and
    when torch.compile wraps the error in its own (the cause chain is followed)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, torch.cuda.OutOfMemoryError) or is_oom_text(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def check_timing_options(opts):
    """One line for timing flags out of range (shared with the sweep, which passes them to its trials, and
    with `steps --calibrate`)."""
    if opts.steps < 0 or opts.warmup < -1:
        raise UserError(f"--steps must be >= 0 (0 = auto) and --warmup >= -1 (-1 = auto); got {opts.steps}, {opts.warmup}")
    peak = opts.get("peak_tflops", 0.0)
    if not (math.isfinite(peak) and peak >= 0):
        raise UserError(f"--peak_tflops must be a finite number >= 0 (0 = the built-in table), got {peak}")


@exit_on_user_error
def main(argv=None):
    usage = "throughput.py PROJECT [PRESET] [--config flags] [--json FILE] [--steps N] [--warmup N] [--peak_tflops F]"
    project, cfg, opts = parse_tool_args(sys.argv[1:] if argv is None else argv, usage, THROUGHPUT_FLAGS)
    check_timing_options(opts)
    try:
        results = measure(project, cfg, opts.steps, opts.warmup, opts.peak_tflops)
    except Exception as e:  # torch.compile wraps errors in its own exception types
        if not is_oom(e):
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
