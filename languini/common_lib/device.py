"""Device and precision choices, kept out of model code (the trainer and tools wire them in)."""

import contextlib
import time

import torch

from languini.common_lib.cpu_heap import keep_cpu_heap
from languini.common_lib.errors import UserError


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` -> cuda:<local_rank> when CUDA is available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA device is available")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"unknown device '{name}'; valid: auto, cpu, cuda")


def configure_device(device: torch.device):
    """Process-wide speed settings for `device`: TF32 for fp32 matmuls on CUDA (bf16/fp16 autocast is
    unaffected); on CPU, a heap that keeps freed pages (see cpu_heap.py)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device.type == "cpu":
        keep_cpu_heap()


def has_native_bf16(device: torch.device) -> bool:
    """Whether the GPU runs bf16 in hardware (Ampere and later). `torch.cuda.is_bf16_supported()` alone
    also says yes where bf16 is only emulated (V100, T4), which is slow: emulation is not counted."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.5 has no including_emulation; bf16 tensor cores came with sm_80
        return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 on GPUs with bf16 in hardware, fp16 (with a gradient scaler) on older GPUs such as
    V100 and T4, fp32 on CPU."""
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise UserError("fp16 needs a CUDA device; use --precision fp32 or bf16 on CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if has_native_bf16(device) else "fp16"
    return "fp32"


def autocast_context(precision: str, device: torch.device):
    """The autocast context for a forward pass at `precision` (fp32: no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def device_name(device: torch.device) -> str:
    """Human-readable accelerator name (e.g. 'NVIDIA H100 80GB HBM3') or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device: torch.device, warmup: int, steps: int) -> float:
    """Mean wall time of `fn()` over `steps` calls after `warmup` untimed ones, the device synchronised."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps
