"""Tokens/s and MFU of a training step on this device, as JSON (the throughput tool's measurement).

    python3 benchmarks/train_throughput.py gpt nano [--config_flag value ...] [--steps 20] [--warmup 5] [--quick]
    python3 benchmarks/train_throughput.py gpt small --train_batch_size 64 --compile default --precision bf16

Times `Trainer.train_step` exactly as training runs it (accumulation, autocast, compile, fused Adam, pinned
non-blocking copies) on random tokens, through `languini.tools.throughput.measure`, and prints its
results as one JSON object. `--quick`: 3 timed steps after 1 warm-up step.
"""

import json
import sys

from languini.common_lib.errors import exit_on_user_error
from languini.tools.throughput import THROUGHPUT_FLAGS, measure
from languini.tools.tool_args import parse_tool_args

USAGE = "train_throughput.py PROJECT [PRESET] [--config flags] [--steps N] [--warmup N] [--quick]"


@exit_on_user_error
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--quick" in argv:
        argv = [a for a in argv if a != "--quick"] + ["--steps", "3", "--warmup", "1"]
    project, cfg, opts = parse_tool_args(argv, USAGE, THROUGHPUT_FLAGS)
    print(json.dumps(measure(project, cfg, opts.steps, opts.warmup, opts.peak_tflops, progress=False)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
