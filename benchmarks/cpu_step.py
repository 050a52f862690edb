"""CPU training-step speed: the trainer's step before and after the fused Adam, against a plain GPT step.

Times, in ONE run with the variants interleaved (A, B, C, A, B, C, ... so that machine noise hits them
alike), full optimiser steps (forward, loss, backward, optimiser) on random tokens:

- `previous`: `Trainer.train_step` with the optimiser the trainer used before, torch's for-loop Adam;
- `new`: `Trainer.train_step` as training runs it now (fused Adam on the CPU);
- `nanogpt_style`: a plain GPT written here (pre-LN blocks, `F.scaled_dot_product_attention`, GELU MLP,
  untied output layer, fp32), AdamW with torch's default implementation (the for-loop on a CPU), weight
  decay on the 2-D weights, `F.cross_entropy`: the same layers, widths, heads, vocabulary, sequence length
  and parameter count as Languini's GPT (GPT cases only);
- `new_compiled` (`--compile`): `new` with `--compile default`; its first steps' time is reported too;
- `new_muon` (`--muon`): `new` with `--optimizer muon`.

for GPT mini B8xL512, GPT mini B4xL128 and quasi-LSTM mini B8xL512. Prints one JSON object: tokens/s
(median over the repeats) per case and variant and the ratios new/previous and new/nanogpt_style, by the
wall clock and by this process's CPU time (`time.process_time`): with `--threads 1` the CPU-time figures
hardly move when other jobs share the machine, while the wall clock (and with 2 threads, both) does.
`--profile` adds the top operators (torch.profiler, self CPU time) of one step of each variant of the
first case, and the optimiser's share of the step.

    python3 benchmarks/cpu_step.py                                   # all cases, 5 repeats
    python3 benchmarks/cpu_step.py --cases gpt_mini_B4xL128 --repeats 3 --profile
    python3 benchmarks/cpu_step.py --threads 1 --compile --muon
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from languini.common_lib.device import device_name
from languini.common_lib.errors import exit_on_user_error
from languini.projects import load_project
from languini.tools.flops import param_counts
from languini.train_lib.distributed import World
from languini.train_lib.optim import build_scheduler
from languini.train_lib.random_batches import RandomBatches
from languini.train_lib.trainer import Trainer

# name -> (project, preset, batch size, sequence length, with the nanoGPT-style baseline)
CASES = {
    "gpt_mini_B8xL512": ("gpt", "mini", 8, 512, True),
    "gpt_mini_B4xL128": ("gpt", "mini", 4, 128, True),
    "lstm_mini_B8xL512": ("lstm", "mini", 8, 512, False),
}


# ---- the nanoGPT-style baseline --------------------------------------------------------------------------


class PlainBlock(nn.Module):
    def __init__(self, h_dim, n_heads, head_dim, mlp_dim):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.ln_1 = nn.LayerNorm(h_dim)
        self.c_attn = nn.Linear(h_dim, 3 * n_heads * head_dim)
        self.c_proj = nn.Linear(n_heads * head_dim, h_dim)
        self.ln_2 = nn.LayerNorm(h_dim)
        self.c_fc = nn.Linear(h_dim, mlp_dim)
        self.c_out = nn.Linear(mlp_dim, h_dim)

    def forward(self, x):
        batch, seq, _ = x.shape
        inner = self.n_heads * self.head_dim
        q, k, v = self.c_attn(self.ln_1(x)).split(inner, dim=2)
        q, k, v = (t.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(batch, seq, inner))
        return x + self.c_out(F.gelu(self.c_fc(self.ln_2(x))))


class PlainGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.h_dim)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.h_dim)
        self.blocks = nn.ModuleList(
            PlainBlock(cfg.h_dim, cfg.n_heads, cfg.head_dim, cfg.mlp_dim) for _ in range(cfg.n_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.h_dim)
        self.lm_head = nn.Linear(cfg.h_dim, cfg.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        h = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.ln_f(h))


class PlainStep:
    """One nanoGPT-style optimiser step: forward, cross-entropy, backward, AdamW (torch's default kernel)."""

    def __init__(self, cfg):
        self.model = PlainGPT(cfg)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.max_lr, betas=(0.9, 0.95))
        self.batches = RandomBatches(cfg)
        self.vocab_size = cfg.vocab_size

    def __call__(self):
        x, y, _ = next(self.batches)
        logits = self.model(x[0])
        loss = F.cross_entropy(logits.view(-1, self.vocab_size), y[0].reshape(-1))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


# ---- the trainer's step ----------------------------------------------------------------------------------


def case_config(project, preset, batch_size, seq_len, **changes):
    cfg = load_project(project).preset_config(preset)
    cfg.train_batch_size, cfg.seq_len, cfg.device, cfg.precision = batch_size, seq_len, "cpu", "fp32"
    for name, value in changes.items():
        setattr(cfg, name, value)
    return cfg


def trainer_step(cfg, previous_optimizer=False):
    """`Trainer.train_step` on random tokens; with previous_optimizer, torch's for-loop Adam (the optimiser
    `build_optimizer` made on a CPU before it used the fused kernel)."""
    torch.manual_seed(0)
    model = load_project(cfg.project).Model(cfg)
    trainer = Trainer(cfg, model, World(), torch.device("cpu"), "fp32", "", "", train_loader=RandomBatches(cfg))
    if previous_optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        trainer.optimizer = torch.optim.Adam(
            params, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=False
        )
        trainer.scheduler = build_scheduler(trainer.optimizer, cfg)
    step = lambda: trainer.train_step(want_norms=False)  # noqa: E731
    return step, model


# ---- timing and profiling --------------------------------------------------------------------------------


def interleaved_times(steps: dict, repeats: int, warmup: int) -> tuple[dict, dict, dict]:
    """Wall and CPU (process) seconds per step of each variant, interleaved; and each variant's warm-up wall
    seconds (compile time)."""
    warmup_s = {}
    for name, step in steps.items():
        start = time.perf_counter()
        for _ in range(warmup):
            step()
        warmup_s[name] = time.perf_counter() - start
    times = {name: [] for name in steps}
    cpu_times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    return times, cpu_times, warmup_s


def profile_step(step, top: int) -> dict:
    """Self CPU time of the top operators in one step, and the optimiser step's total."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    optimizer_ms = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step#")) / 1e3
    ops = sorted((e for e in events if not e.key.startswith(("Optimizer.", "## "))), key=lambda e: -e.self_cpu_time_total)
    return {
        "step_ms": round(wall * 1e3, 1),
        "optimizer_step_ms": round(optimizer_ms, 1),
        "optimizer_share": round(optimizer_ms / (wall * 1e3), 3),
        "top_ops_self_ms": {e.key: round(e.self_cpu_time_total / 1e3, 1) for e in ops[:top]},
    }


def run_case(name, repeats, warmup, with_compile, with_muon, profile, top):
    project, preset, batch_size, seq_len, with_baseline = CASES[name]
    cfg = case_config(project, preset, batch_size, seq_len)
    steps = {}
    steps["previous"], _ = trainer_step(cfg, previous_optimizer=True)
    steps["new"], model = trainer_step(cfg)
    if with_baseline:
        torch.manual_seed(0)
        steps["nanogpt_style"] = PlainStep(cfg)
    if with_compile:
        steps["new_compiled"], _ = trainer_step(case_config(project, preset, batch_size, seq_len, compile="default"))
    if with_muon:
        steps["new_muon"], _ = trainer_step(case_config(project, preset, batch_size, seq_len, optimizer="muon"))
    times, cpu_times, warmup_s = interleaved_times(steps, repeats, warmup)
    tokens = batch_size * seq_len
    median = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: round(tokens / s, 1) for k, s in median.items()}
    cpu_tps = {k: round(tokens / statistics.median(v), 1) for k, v in cpu_times.items()}
    result = {
        "project": project,
        "preset": preset,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tokens_per_step": tokens,
        "params": param_counts(model, cfg.vocab_size)[0],
        "tokens_per_second": tps,
        "step_ms_median": {k: round(s * 1e3, 1) for k, s in median.items()},
        "step_ms_min": {k: round(min(v) * 1e3, 1) for k, v in times.items()},
        "tokens_per_cpu_second": cpu_tps,
        "ratios": {},
        "cpu_time_ratios": {},
    }
    pairs = {"new_vs_previous": ("new", "previous")}
    if with_baseline:
        result["params_nanogpt_style"] = sum(p.numel() for p in steps["nanogpt_style"].model.parameters())
        pairs["new_vs_nanogpt_style"] = ("new", "nanogpt_style")
    if with_compile:
        pairs["compiled_vs_new"] = ("new_compiled", "new")
        result["compile_warmup_seconds"] = round(warmup_s["new_compiled"], 1)
    if with_muon:
        pairs["muon_vs_new"] = ("new_muon", "new")
    for ratio, (a, b) in pairs.items():
        result["ratios"][ratio] = round(tps[a] / tps[b], 3)
        result["cpu_time_ratios"][ratio] = round(cpu_tps[a] / cpu_tps[b], 3)
    if profile:
        result["profile"] = {k: profile_step(step, top) for k, step in steps.items()}
    return result


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant, interleaved")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = torch's default)")
    parser.add_argument("--compile", action="store_true", help="also time the step with --compile default")
    parser.add_argument("--muon", action="store_true", help="also time the step with --optimizer muon")
    parser.add_argument("--profile", action="store_true", help="top operators of the first case's steps")
    parser.add_argument("--top", type=int, default=12, help="operators listed per profile")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {
        "benchmark": "cpu_step",
        "device": device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "unit": "tokens per wall second (and per CPU second of this process) of full optimiser steps, median "
        "over interleaved repeats, fp32",
        "load_average_1min_before": round(os.getloadavg()[0], 2),
        "cases": {},
    }
    for i, name in enumerate(args.cases):
        results["cases"][name] = run_case(
            name, args.repeats, args.warmup, args.compile, args.muon, args.profile and i == 0, args.top
        )
        print(json.dumps({name: results["cases"][name]}), file=sys.stderr, flush=True)
    goal = [c["ratios"].get("new_vs_nanogpt_style") for c in results["cases"].values()]  # wall-clock ratios
    results["min_new_vs_nanogpt_style"] = min((g for g in goal if g is not None), default=None)
    results["load_average_1min_after"] = round(os.getloadavg()[0], 2)  # other work on the machine
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
