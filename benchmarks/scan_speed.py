"""Speed of the quasi-LSTM recurrence alone: reference loop vs block-parallel PyTorch scan vs Triton scan.

Prints one JSON object: per kernel the forward and forward + backward time in ms (warm-up excluded,
device synchronised), the bandwidth that time implies for the minimum memory traffic (forward reads f, u
and writes c; backward reads f, c, grad_c and writes grad_f, grad_u; each tensor at its own dtype's
element size), and the largest difference of c
from the reference loop. The default shape is one layer of quasi-LSTM small (12 heads x 64 = 768
channels) at batch 16, seq_len 512. The Triton scan runs on CUDA only; elsewhere it is listed as skipped.

    python3 benchmarks/scan_speed.py --quick                 # tiny shape, CPU, a few seconds
    python3 benchmarks/scan_speed.py --device cuda --json benchmarks/results/scan_speed.json
"""

import argparse
import functools
import importlib.util
import json
import sys

import torch
from tqdm import tqdm

from languini.common_lib.atomic_io import atomic_write_json
from languini.common_lib.device import configure_device, device_name, resolve_device, seconds_per_call
from languini.common_lib.errors import exit_on_user_error
from languini.projects.lstm.scans import scan_block_parallel, scan_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def available_kernels(device: torch.device, block_length: int) -> tuple[dict, dict]:
    """({name: scan function}, {name: why it was skipped}) for this device."""
    kernels = {
        "reference_loop": scan_reference,
        "block_parallel": functools.partial(scan_block_parallel, block_length=block_length),
    }
    skipped = {}
    if device.type != "cuda":
        skipped["triton"] = "the Triton scan needs a CUDA device"
    elif importlib.util.find_spec("triton") is None:
        skipped["triton"] = "triton is not installed (pip install -e '.[triton]')"
    else:
        from languini.projects.lstm.triton_scan import scan_triton

        kernels["triton"] = scan_triton
    return kernels, skipped


def traffic_bytes(kernel, inputs: dict) -> tuple[int, int]:
    """Minimum bytes moved by (forward, backward), each tensor counted at its own dtype's size.

    With `--dtype bf16`, f and u (and their gradients) are 2-byte but c0 and grad_c are fp32, and a
    kernel may return c in fp32 (the Triton scan) or in the inputs' dtype, so one element size for all
    would misstate the traffic. One untimed call gives the dtypes of c and the gradients.
    """
    f, u, c0, grad_c = inputs["f"], inputs["u"], inputs["c0"], inputs["grad_c"]
    leaves = [t.detach().requires_grad_() for t in (f, u, c0)]
    c = kernel(*leaves)
    grad_f, grad_u, _ = torch.autograd.grad(c, leaves, grad_c)
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    return nbytes(f) + nbytes(u) + nbytes(c), sum(map(nbytes, (f, c, grad_c, grad_f, grad_u)))


def measure(kernel, inputs: dict, device: torch.device, warmup: int, steps: int) -> dict:
    f, u, c0, grad_c = inputs["f"], inputs["u"], inputs["c0"], inputs["grad_c"]
    leaves = [t.detach().requires_grad_() for t in (f, u, c0)]

    def forward():
        with torch.no_grad():
            return kernel(f, u, c0)

    def forward_backward():
        torch.autograd.grad(kernel(*leaves), leaves, grad_c)

    fwd_ms = seconds_per_call(forward, device, warmup, steps) * 1e3
    fwd_bwd_ms = seconds_per_call(forward_backward, device, warmup, steps) * 1e3
    fwd_bytes, bwd_bytes = traffic_bytes(kernel, inputs)
    return {
        "forward_ms": round(fwd_ms, 4),
        "forward_backward_ms": round(fwd_bwd_ms, 4),
        "forward_gb_per_s": float(f"{fwd_bytes / fwd_ms / 1e6:.4g}"),
        "forward_backward_gb_per_s": float(f"{(fwd_bytes + bwd_bytes) / fwd_bwd_ms / 1e6:.4g}"),
        "max_abs_diff_vs_reference": (forward().float() - inputs["expected"]).abs().max().item(),
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--width", type=int, default=768, help="channels: n_heads * head_dim")
    parser.add_argument("--block_length", type=int, default=16, help="block length of the PyTorch scan")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype of f and u (c0 is fp32)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="batch 2, seq_len 64, width 64, 2 timed steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.seq_len, args.width, args.warmup, args.steps = 2, 64, 64, 1, 2
    return args


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    configure_device(device)  # as the trainer does
    torch.manual_seed(0)
    shape = (args.batch_size, args.seq_len, args.width)
    inputs = {
        "f": torch.rand(shape, device=device).to(DTYPES[args.dtype]),
        "u": torch.randn(shape, device=device).to(DTYPES[args.dtype]),
        "c0": torch.randn(args.batch_size, args.width, device=device),
        "grad_c": torch.randn(shape, device=device),
    }
    inputs["expected"] = scan_reference(inputs["f"].float(), inputs["u"].float(), inputs["c0"])
    kernels, skipped = available_kernels(device, args.block_length)
    results = {name: measure(kernel, inputs, device, args.warmup, args.steps) for name, kernel in tqdm(
        kernels.items(), desc="scan kernels", file=sys.stderr)}  # fmt: skip
    speedups = {
        f"{fast}_vs_{slow}_forward_backward": round(
            results[slow]["forward_backward_ms"] / results[fast]["forward_backward_ms"], 2
        )
        for fast, slow in [("block_parallel", "reference_loop"), ("triton", "block_parallel")]
        if fast in results
    }
    report = {
        "benchmark": "scan_speed",
        "device": device_name(device),
        "torch": torch.__version__,
        "shape_btn": list(shape),
        "dtype": args.dtype,
        "block_length": args.block_length,
        "steps": args.steps,
        "results": results,
        "speedups": speedups,
        "skipped": skipped,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        atomic_write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
