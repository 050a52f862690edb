"""Analytic training memory per process of each GPT preset under DDP and FSDP, as JSON (docs/training.md).

    python3 benchmarks/memory.py              # JSON: every preset, ddp / fsdp, fp32 / bf16, W = 1 2 4 8
    python3 benchmarks/memory.py --table      # the markdown table of docs/training.md

Counts the model states only: parameters, gradients and Adam's two moments, all fp32 (the master weights;
bf16 autocast / FSDP mixed precision computes in bf16 but keeps fp32 weights). **Activations are
excluded**: they scale with the micro-batch (rows x seq_len) and are what --gradient_accumulation_steps and
--activation_checkpointing cut, so add them for a given batch.

- ddp: every process holds everything: 4 + 4 + 8 = 16 bytes per parameter, whatever W.
- fsdp: the 16 bytes per parameter are sharded over W processes; in addition, while it runs, a process
  holds the gathered (unsharded) parameters of the root module (embeddings, final norm, output layer: not
  resharded between forward and backward) and of two blocks (the one running and the one prefetched), in
  the compute dtype (bf16 under --precision bf16, else fp32), plus one block's full fp32 gradients before
  they are reduce-scattered. With W = 1 the trainer does not shard: the same as ddp.

tests/test_parallel.py checks the ddp figure against the tensors of a real nano model after one step.
"""

import json
import sys

import torch

GiB = 2**30
GPU_SIZES = {"24GB": 24e9, "80GB": 80e9}
WORLDS = (1, 2, 4, 8)


def bytes_per_process(n_params: int, mode: str, world: int, precision: str = "fp32", root_params: int = 0,
                      block_params: int = 0) -> dict:
    """Bytes of parameters, gradients, optimiser state and gathered (unsharded) working set per process."""
    shards = world if mode == "fsdp" and world > 1 else 1
    out = {
        "params": 4 * n_params / shards,
        "grads": 4 * n_params / shards,
        "optimizer": 8 * n_params / shards,  # Adam exp_avg + exp_avg_sq, fp32
        "gathered": 0.0,
    }
    if shards > 1:
        compute_bytes = 2 if precision == "bf16" else 4
        out["gathered"] = compute_bytes * (root_params + 2 * block_params) + 4 * block_params
    out["total"] = sum(out.values())
    return out


def preset_sizes(preset: str) -> tuple[int, int, int]:
    """(all parameters, root parameters outside the blocks, parameters of one block) of a GPT preset."""
    from languini.projects import load_project

    spec = load_project("gpt")
    cfg = spec.preset_config(preset)
    with torch.device("meta"):
        model = spec.Model(cfg)
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.layers[0].parameters())
    return total, total - block * len(model.layers), block


def report() -> dict:
    from languini.projects import load_project

    presets = list(load_project("gpt").presets) if hasattr(load_project("gpt"), "presets") else None
    if not presets:
        from languini.projects.gpt.configs import PRESETS

        presets = list(PRESETS)
    out = {
        "unit": "GiB per process",
        "counts": "fp32 parameters + fp32 gradients + Adam's 2 fp32 moments (+ fsdp's gathered working set)",
        "activations": "excluded (they depend on the micro-batch; see --gradient_accumulation_steps, "
        "--activation_checkpointing)",
        "presets": {},
        "largest_preset_that_fits": {},
        "max_params_that_fit": {},  # model states only: 16 bytes per parameter / shards, gathered set ignored
    }
    modes = [("ddp", "fp32"), ("fsdp", "fp32"), ("fsdp", "bf16")]
    for preset in presets:
        n, root, block = preset_sizes(preset)
        entry = {"params": n}
        for mode, precision in modes:
            entry[f"{mode}_{precision}"] = {
                str(w): {k: round(v / GiB, 3) for k, v in bytes_per_process(n, mode, w, precision, root, block).items()}
                for w in WORLDS
            }
        out["presets"][preset] = entry
    for gpu, size in GPU_SIZES.items():
        fits = {}
        for mode, precision in modes:
            for w in WORLDS:
                ok = [p for p, e in out["presets"].items() if e[f"{mode}_{precision}"][str(w)]["total"] * GiB <= size]
                fits[f"{mode}_{precision}_W{w}"] = ok[-1] if ok else None
        out["largest_preset_that_fits"][gpu] = fits
        out["max_params_that_fit"][gpu] = {"ddp": int(size / 16), **{f"fsdp_W{w}": int(size * w / 16) for w in WORLDS[1:]}}
    return out


def table(data: dict) -> str:
    rows = ["| preset | params | ddp (any W) | fsdp W=2 | fsdp W=4 | fsdp W=8 | fsdp bf16 W=8 |", "|---|---|---|---|---|---|---|"]
    for preset, e in data["presets"].items():
        rows.append(
            f"| {preset} | {e['params'] / 1e6:,.1f} M | {e['ddp_fp32']['1']['total']:.2f} | "
            f"{e['fsdp_fp32']['2']['total']:.2f} | {e['fsdp_fp32']['4']['total']:.2f} | "
            f"{e['fsdp_fp32']['8']['total']:.2f} | {e['fsdp_bf16']['8']['total']:.2f} |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    data = report()
    print(table(data) if "--table" in argv else json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
