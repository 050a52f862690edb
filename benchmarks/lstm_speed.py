"""Training-step throughput of the LSTM cells: block-parallel quasi-LSTM vs its step-by-step loop vs
the classic LSTM (and the coupled quasi-LSTM; the Triton scan too when a CUDA device has Triton).

Prints one JSON object: per preset and variant, tokens/s of a forward + backward pass on random tokens
(warm-up excluded, device synchronised), plus the speed-up of the block-parallel scan over the loop,
for the whole model (the scan's default form for the device) and for the recurrence alone (the scan on
that preset's [batch, seq_len, N] gates, both forms of a block: "matrix" and "steps").

    python3 benchmarks/lstm_speed.py --quick                  # nano, a few seconds on CPU
    python3 benchmarks/lstm_speed.py --presets nano mini --device cuda
"""

import argparse
import dataclasses
import json
import sys

import torch

from languini.common_lib.device import configure_device, device_name, resolve_device, seconds_per_call
from languini.common_lib.errors import exit_on_user_error
from languini.projects import load_project
from languini.projects.lstm.model import Model
from languini.projects.lstm.scans import scan_block_parallel, scan_reference
from languini.train_lib.loss import lm_loss

VARIANTS = {
    "quasi_block_parallel": dict(scan="torch"),
    "quasi_reference_loop": dict(scan="reference"),
    "quasi_coupled_block_parallel": dict(scan="torch", coupled=True),
    "classic_lstm": dict(non_quasi=True),
}


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def tokens_per_second(config, device, batch_size: int, warmup: int, steps: int) -> float:
    """Tokens/s of forward + backward of `config` on random tokens (timing excludes the warm-up)."""
    torch.manual_seed(0)
    model = Model(config).to(device)
    x = torch.randint(0, config.vocab_size, (batch_size, config.seq_len + 1), device=device)
    state = model.get_init_state(batch_size, device)

    def step():
        logits, _ = model(x[:, :-1], state)
        lm_loss(logits, x[:, 1:]).backward()
        model.zero_grad(set_to_none=True)

    return batch_size * config.seq_len / seconds_per_call(step, device, warmup, steps)


def scan_tokens_per_second(config, device, batch_size: int, warmup: int, steps: int) -> dict:
    """Tokens/s of forward + backward of the recurrence alone: both block-parallel forms vs the loop."""
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (batch_size, config.seq_len, config.n_heads * config.head_dim)
    f = torch.sigmoid(torch.randn(shape, generator=gen, device=device) + 1).requires_grad_()
    u = torch.randn(shape, generator=gen, device=device).requires_grad_()
    c0 = torch.zeros(shape[0], shape[2], device=device)
    grad_c = torch.randn(shape, generator=gen, device=device)  # as from the layer above: contiguous
    scans = {
        "block_parallel_matrix": lambda: scan_block_parallel(f, u, c0, config.block_length, "matrix"),
        "block_parallel_steps": lambda: scan_block_parallel(f, u, c0, config.block_length, "steps"),
        "loop": lambda: scan_reference(f, u, c0),
    }
    out = {}
    for name, scan in scans.items():
        # a scan takes milliseconds: at least 20 timed calls, or the figure is mostly noise
        seconds = seconds_per_call(lambda scan=scan: scan().backward(grad_c), device, warmup + 2, max(steps, 20))
        out[name] = round(batch_size * config.seq_len / seconds)
    for name in ("block_parallel_matrix", "block_parallel_steps"):
        out[f"speedup_{name.removeprefix('block_parallel_')}_vs_loop"] = round(out[name] / out["loop"], 2)
    return out


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["nano", "mini"], help="LSTM presets to measure")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--quick", action="store_true", help="nano only, batch 4, 2 timed steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.presets, args.batch_size, args.steps = ["nano"], 4, 2
    return args


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    configure_device(device)  # as the trainer does
    variants = dict(VARIANTS)
    if device.type == "cuda" and _has_triton():
        variants["quasi_triton"] = dict(scan="triton")
    results = {}
    for preset in args.presets:
        base = dataclasses.replace(load_project("lstm").preset_config(preset), seq_len=args.seq_len)
        speeds = {
            name: round(tokens_per_second(dataclasses.replace(base, **overrides), device, args.batch_size,
                                          args.warmup, args.steps))
            for name, overrides in variants.items()
        }  # fmt: skip
        speeds["speedup_block_parallel_vs_loop"] = round(
            speeds["quasi_block_parallel"] / speeds["quasi_reference_loop"], 2
        )
        speeds["scan_only"] = scan_tokens_per_second(base, device, args.batch_size, args.warmup, args.steps)
        results[preset] = speeds
    report = {
        "benchmark": "lstm_speed",
        "unit": "tokens/s, forward + backward",
        "device": device_name(device),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
