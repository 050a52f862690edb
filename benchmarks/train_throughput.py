"""Tokens/s and MFU of the trainer's own training step (forward, backward, optimiser) on this device.

    python3 benchmarks/train_throughput.py gpt nano [--config_flag value ...] [--steps 20] [--warmup 5] [--quick]
    python3 benchmarks/train_throughput.py gpt small --train_batch_size 64 --compile default --precision bf16

Runs `Trainer.train_step` exactly as training does (accumulation, autocast, compile, fused Adam, pinned
non-blocking copies) on random tokens, with the device synchronised around the timed steps. FLOPs per token come from
`torch.utils.flop_counter` (languini.common_lib.flops), the peak from languini.common_lib.hardware. Prints JSON.
"""

import json
import sys
import time

import torch
from tqdm import tqdm

from languini.common_lib.config import parse_config
from languini.common_lib.device import device_name, resolve_device, resolve_precision, synchronize
from languini.common_lib.errors import UserError, exit_on_user_error
from languini.common_lib.flops import count_step_flops
from languini.common_lib.hardware import mfu, peak_tflops
from languini.common_lib.projects import import_project_module
from languini.train_lib.distributed import World
from languini.train_lib.trainer import Trainer, check_batch_layout

BENCH_FLAGS = {"--steps": 20, "--warmup": 5}


class RandomBatches:
    """Stands in for the stream loader: uniform random tokens shaped [micro_batches, rows, seq_len]."""

    def __init__(self, cfg):
        rows = cfg.train_batch_size // cfg.gradient_accumulation_steps
        self.shape = (cfg.gradient_accumulation_steps, rows, cfg.seq_len)
        self.vocab_size = cfg.vocab_size

    def __next__(self):
        tokens = torch.randint(3, self.vocab_size, self.shape[:-1] + (self.shape[-1] + 1,))
        return tokens[..., :-1], tokens[..., 1:], torch.zeros(self.shape, dtype=torch.bool)


def split_bench_flags(argv: list[str]) -> tuple[dict, bool, list[str]]:
    """(benchmark options, quick, remaining config argv)."""
    options, quick, rest, i = dict(BENCH_FLAGS), False, [], 0
    while i < len(argv):
        if argv[i] == "--quick":
            quick, i = True, i + 1
        elif argv[i] in BENCH_FLAGS:
            if i + 1 >= len(argv) or not argv[i + 1].isdigit():
                raise UserError(f"{argv[i]} needs a whole number")
            options[argv[i]], i = int(argv[i + 1]), i + 2
        else:
            rest.append(argv[i])
            i += 1
    return options, quick, rest


def measure(cfg, steps: int, warmup: int) -> dict:
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    check_batch_layout(cfg, 1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    model = import_project_module(cfg.project, "model").Model(cfg).to(device)
    trainer = Trainer(cfg, model, World(), device, precision, "", "", train_loader=RandomBatches(cfg))
    for _ in tqdm(range(warmup), desc="warm-up", leave=False):
        trainer.train_step(want_norms=False)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc="timed", leave=False):
        loss, _ = trainer.train_step(want_norms=False)
    loss = loss.item()  # waits for the last step
    seconds = time.perf_counter() - start
    tokens = steps * cfg.train_batch_size * cfg.seq_len
    flops_per_token = count_step_flops(cfg.project, cfg).forward_backward_per_token
    achieved_tflops = tokens / seconds * flops_per_token / 1e12
    return {
        "project": cfg.project,
        "preset": cfg.preset,
        "device": device_name(device),
        "precision": precision,
        "compile": cfg.compile,
        "train_batch_size": cfg.train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "seq_len": cfg.seq_len,
        "n_params": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "step_ms": round(1000 * seconds / steps, 3),
        "tokens_per_second": round(tokens / seconds, 1),
        "achieved_tflops": round(achieved_tflops, 3),
        "mfu": mfu(achieved_tflops, peak_tflops(device_name(device))),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        if device.type == "cuda"
        else None,
        "final_loss": round(loss, 4),
    }


@exit_on_user_error
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    options, quick, rest = split_bench_flags(argv[1:])
    configs = import_project_module(argv[0], "configs")
    cfg = parse_config(configs.Config, configs.PRESETS, rest, "train_throughput.py", configs.DEFAULT_PRESET)
    if quick:
        options = {"--steps": 3, "--warmup": 1}
    print(json.dumps(measure(cfg, options["--steps"], options["--warmup"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
