"""Count a config's FLOPs: `python3 languini/common_lib/flops_profile.py PROJECT [PRESET] [--flags]`.

Prints forward and forward+backward FLOPs per sequence and per token, broken down by module
(torch.utils.flop_counter, counted on the meta device: nothing is allocated). For GPT it cross-checks the
count against the analytic formula, and shows the original's DeepSpeed forward figures beside ours.
"""

import sys

from languini.common_lib.atomic_io import atomic_write_json
from languini.common_lib.errors import exit_on_user_error
from languini.tools.compute_classes import modified_model_fields
from languini.tools.flops import analytic_gpt_forward_flops, count_step_flops
from languini.tools.tool_args import parse_tool_args

# The original's DeepSpeed profile of one forward pass, batch 1, 512 tokens (its "flops" column).
DEEPSPEED_FORWARD_FLOPS = {"gpt": {"mini": 20.42e9, "tiny": 45.13e9, "small": 109.61e9, "medium": 352.42e9}}
ANALYTIC_TOLERANCE = 0.02

PROFILE_FLAGS = {"json": (str, "", "also write the counts to this JSON file")}


def profile(project: str, cfg) -> dict:
    """FLOP counts of one training step of the config, per sequence and per token, with cross-checks."""
    count = count_step_flops(project, cfg, cfg.train_batch_size)
    per_seq = 1 / count.batch_size
    result = {
        "project": project,
        "preset": cfg.preset,
        "batch_size": count.batch_size,
        "seq_len": count.seq_len,
        "counted_on": count.counted_on,
        "forward_per_sequence": count.forward * per_seq,
        "forward_backward_per_sequence": count.forward_backward * per_seq,
        "forward_per_token": count.forward_per_token,
        "forward_backward_per_token": count.forward_backward_per_token,
        "by_module_per_sequence": {
            name: {"forward": fwd * per_seq, "forward_backward": both * per_seq}
            for name, (fwd, both) in count.by_module.items()
        },
    }
    if project == "gpt":
        analytic = analytic_gpt_forward_flops(cfg)
        result["analytic_forward_per_sequence"] = analytic
        result["analytic_relative_difference"] = result["forward_per_sequence"] / analytic - 1
    reference = DEEPSPEED_FORWARD_FLOPS.get(project, {}).get(cfg.preset)
    if reference and cfg.seq_len == 512 and not modified_model_fields(project, cfg):
        result["deepspeed_forward_per_sequence"] = reference
    return result


def _g(flops: float) -> str:
    return f"{flops / 1e9:,.2f} G"


def format_profile(r: dict) -> str:
    lines = [
        f"{r['project']} {r['preset']}: batch {r['batch_size']} x {r['seq_len']} tokens "
        f"(torch.utils.flop_counter on {r['counted_on']}; matmuls only, 1 multiply-add = 2 FLOPs)",
        f"{'':<22}{'per sequence':>16}{'per token':>16}",
        f"{'forward':<22}{_g(r['forward_per_sequence']):>16}{r['forward_per_token'] / 1e6:>14,.2f} M",
        f"{'forward+backward':<22}{_g(r['forward_backward_per_sequence']):>16}"
        f"{r['forward_backward_per_token'] / 1e6:>14,.2f} M",
        "",
        f"by module, per sequence ({'forward':>12} {'fwd+bwd':>12}):",
    ]
    for name, c in sorted(r["by_module_per_sequence"].items()):
        label = "  " * (name.count(".") + 1) + name
        lines.append(f"{label:<40}{_g(c['forward']):>12} {_g(c['forward_backward']):>12}")
    if "analytic_forward_per_sequence" in r:
        diff = r["analytic_relative_difference"]
        verdict = "OK" if abs(diff) <= ANALYTIC_TOLERANCE else "MISMATCH"
        lines += [
            "",
            f"analytic forward (2 x matmul params x tokens + attention): {_g(r['analytic_forward_per_sequence'])}, "
            f"counter differs by {diff:+.3%}: {verdict} (tolerance {ANALYTIC_TOLERANCE:.0%})",
        ]
    if "deepspeed_forward_per_sequence" in r:
        ref = r["deepspeed_forward_per_sequence"]
        lines.append(
            f"original (DeepSpeed profiler, forward, 512 tokens): {_g(ref)}; ours / theirs = "
            f"{r['forward_per_sequence'] / ref:.4f} (DeepSpeed also counts LayerNorm, GELU, softmax, ...)"
        )
    return "\n".join(lines)


@exit_on_user_error
def main(argv=None):
    usage = "flops_profile.py PROJECT [PRESET] [--config flags] [--json FILE]"
    project, cfg, opts = parse_tool_args(sys.argv[1:] if argv is None else argv, usage, PROFILE_FLAGS)
    result = profile(project, cfg)
    print(format_profile(result))
    if opts.json:
        atomic_write_json(opts.json, result)
        print(f"wrote {opts.json}")
    return 1 if abs(result.get("analytic_relative_difference", 0.0)) > ANALYTIC_TOLERANCE else 0


if __name__ == "__main__":
    sys.exit(main())
