"""The Transformer++ project: parameter counts, rotary embeddings, RMSNorm, SwiGLU, FLOPs, and learning."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import exit_code, first_and_last_losses, nano_demo_args, write_bigram_corpus
from torch.utils.flop_counter import FlopCounterMode

from languini.projects import load_project
from languini.projects.transformerpp import main as tpp_main
from languini.projects.transformerpp.model import Block, RMSNorm, SwiGLU, apply_rope, rope_tables
from languini.tools import flops_profile
from languini.train_lib.loggers import read_metrics

SPEC = load_project("transformerpp")
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread
GPT_PARAMS = {
    "mini": 27_549_696, "tiny": 53_912_064, "small": 110_615_040, "medium": 336_390_144,
    "large": 731_077_632, "XL": 1_478_160_384,
}  # fmt: skip
PARAMS = {
    "nano": 1_475_200, "mini": 27_529_728, "tiny": 53_484_288, "small": 110_119_680, "medium": 332_448_768,
    "large": 729_884_160, "XL": 1_482_786_816,
}  # fmt: skip


def meta_model(preset, **overrides):
    with torch.device("meta"):
        return SPEC.Model(dataclasses.replace(SPEC.preset_config(preset), **overrides))


def small_config(**overrides):
    fields = dict(
        vocab_size=64, seq_len=24, n_layers=2, h_dim=32, head_dim=8, n_heads=3, mlp_dim=48, device="cpu"
    )
    return dataclasses.replace(SPEC.preset_config("nano"), **{**fields, **overrides})


@pytest.mark.parametrize("preset", PARAMS)
def test_parameter_counts_match_gpt_within_ten_percent(preset):
    model = meta_model(preset)
    count = sum(p.numel() for p in model.parameters())
    assert count == PARAMS[preset]  # the figures in the project's README
    gpt = GPT_PARAMS.get(preset)
    if gpt is None:  # nano: GPT's nano counted the same way
        with torch.device("meta"):
            gpt = sum(
                p.numel()
                for p in load_project("gpt").Model(load_project("gpt").preset_config("nano")).parameters()
            )
    assert abs(count / gpt - 1) < 0.10, (preset, count, gpt)
    cfg = SPEC.preset_config(preset)
    gpt_cfg = load_project("gpt").preset_config(preset)
    for field in ("n_layers", "h_dim", "head_dim", "n_heads", "seq_len", "vocab_size"):
        assert getattr(cfg, field) == getattr(gpt_cfg, field), field


def test_no_biases_no_learned_positions_untied_output_and_per_block_layers():
    model = meta_model("mini")
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert len(tables) == 1 and tables[0].num_embeddings == 16384  # tokens only
    assert model.linear.weight is not model.input_embedding.weight
    assert isinstance(model.layers, torch.nn.ModuleList) and len(model.layers) == 4


# ---------------------------------------------------------------------------------------------------
# Rotary position embeddings


def rope_by_complex_numbers(x, base):
    """An independent RoPE: pair (x_i, x_{i+d/2}) is the complex number x_i + i x_{i+d/2}, multiplied by
    exp(i t base^(-2i/d)) at position t."""
    length, d = x.shape[-2], x.shape[-1]
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :])
    freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(length, dtype=torch.float64)[:, None] * freq
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


def test_rope_equals_complex_rotation_and_keeps_norms():
    x = torch.randn(2, 3, 17, 8, dtype=torch.float64)
    cos, sin = rope_tables(17, 8, 10000.0, "cpu", torch.float64)
    rotated = apply_rope(x, cos, sin)
    torch.testing.assert_close(rotated, rope_by_complex_numbers(x, 10000.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(rotated[..., 0, :], x[..., 0, :], rtol=0, atol=0)  # position 0: no rotation


def test_rope_scores_depend_only_on_relative_positions():
    """q_m . k_n after rotation equals q_{m+s} . k_{n+s}: a shifted window gives the same scores."""
    q, k = torch.randn(2, 4, 10, 16, dtype=torch.float64).unbind(0)
    shift = 7
    cos, sin = rope_tables(10 + shift, 16, 10000.0, "cpu", torch.float64)
    at_start = apply_rope(q, cos[:10], sin[:10]) @ apply_rope(k, cos[:10], sin[:10]).transpose(-1, -2)
    shifted = apply_rope(q, cos[shift:], sin[shift:]) @ apply_rope(k, cos[shift:], sin[shift:]).transpose(
        -1, -2
    )
    torch.testing.assert_close(shifted, at_start, rtol=0, atol=1e-12)


def test_attention_is_causal_softmax_with_rotated_queries_and_keys():
    """The block's attention equals a hand-written causal softmax over complex-rotated q and k."""
    cfg = small_config()
    torch.manual_seed(0)
    block = Block(cfg).double()
    x = torch.randn(2, 11, cfg.h_dim, dtype=torch.float64)
    cos, sin = rope_tables(11, cfg.head_dim, cfg.rope_base, "cpu", torch.float64)
    attn = block.attn
    q, k, v = attn.qkv(x).view(2, 11, 3, cfg.n_heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
    q, k = rope_by_complex_numbers(q, cfg.rope_base), rope_by_complex_numbers(k, cfg.rope_base)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(cfg.head_dim)
    scores = scores.masked_fill(~torch.ones(11, 11, dtype=torch.bool).tril(), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 11, -1)
    torch.testing.assert_close(attn(x, cos, sin), attn.out(y), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# RMSNorm and SwiGLU


def test_rmsnorm_is_the_formula_and_matches_torch():
    norm = RMSNorm(12).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(12))
    x = torch.randn(3, 5, 12, dtype=torch.float64) * 4 + 1
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (12,), norm.weight, eps=1e-6), rtol=0, atol=1e-12)
    half = norm.float()(x.to(torch.bfloat16))  # computed in fp32, returned in the input's dtype
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), expected, rtol=2e-2, atol=2e-2)


def test_swiglu_is_silu_gate_times_up_projected():
    torch.manual_seed(0)
    mlp = SwiGLU(16, 24, n_layers=2).double()
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    w_gate, w_up = mlp.fc.weight[:24], mlp.fc.weight[24:]
    gate = x @ w_gate.T
    expected = (gate * torch.sigmoid(gate) * (x @ w_up.T)) @ mlp.proj.weight.T
    torch.testing.assert_close(mlp(x), expected, rtol=0, atol=1e-12)
    assert mlp.fc.bias is None and mlp.proj.bias is None


# ---------------------------------------------------------------------------------------------------
# FLOPs


def test_flop_counter_matches_a_hand_count_of_one_block():
    """One block, forward: qkv, attention output and SwiGLU matmuls (2 FLOPs per multiply-add) plus the
    two T x T attention products of scaled_dot_product_attention, counted over the full square."""
    cfg = SPEC.preset_config("small")
    batch, length, h, inner, f = 2, cfg.seq_len, cfg.h_dim, cfg.n_heads * cfg.head_dim, cfg.mlp_dim
    with torch.device("meta"):
        block = Block(cfg)
        x = torch.randn(batch, length, h)
        cos, sin = rope_tables(length, cfg.head_dim, cfg.rope_base, "meta", torch.float32)
    with FlopCounterMode(display=False) as counter:
        block(x, cos, sin)
    matmuls = 2 * batch * length * (h * 3 * inner + inner * h + h * 2 * f + f * h)
    attention = 2 * (2 * batch * length * length * inner)  # QK^T and AV
    assert counter.get_total_flops() == matmuls + attention


def test_flops_profile_runs(capsys):
    assert flops_profile.main(["transformerpp", "nano", "--train_batch_size", "1"]) == 0
    out = capsys.readouterr().out
    assert "transformerpp nano" in out and "layers.*.attn" in out


@pytest.mark.slow
def test_flops_profile_of_small():
    result = flops_profile.profile("transformerpp", SPEC.preset_config("small"))
    assert result["forward_per_sequence"] == pytest.approx(109.52e9, rel=1e-3)


# ---------------------------------------------------------------------------------------------------
# Training


def run_main(argv) -> int:
    return exit_code(tpp_main.main, argv)


TINY = [
    "nano", "--vocab_size", "256", "--dataset", "synth_256", "--n_layers", "1", "--h_dim", "32", "--head_dim", "8",
    "--n_heads", "2", "--mlp_dim", "64", "--seq_len", "16", "--train_batch_size", "4", "--eval_batch_size", "4",
    "--max_eval_steps", "2", "--decay_steps", "100", "--warmup_steps", "5", "--log_metrics_every", "1",
    "--log_terminal_every", "1000", "--log_grads_every", "0", "--log_ckpt_every", "1000", "--eval_every", "0",
    "--logger_type", "none", "--no-progress_bar", "--device", "cpu",
]  # fmt: skip


def test_loss_drops_on_learnable_corpus(tmp_path):
    data_root = tmp_path / "bigram"
    write_bigram_corpus(data_root)
    run_dir = tmp_path / "run"
    paths = ["--data_root", str(data_root), "--run_dir", str(run_dir)]
    args = [*TINY, *paths, "--max_train_steps", "100", "--max_lr", "1e-2"]
    assert run_main(args) == 0
    first, last = first_and_last_losses(run_dir)
    assert first > 5.0 and last < 0.5 * first, (first, last)


@pytest.mark.slow
def test_nano_learns_the_demo_corpus(tmp_path, demo_data_root):
    """The nano preset on the demo corpus: loss drops clearly within 100 steps, validation included."""
    run_dir = tmp_path / "run"
    assert run_main(nano_demo_args(demo_data_root, run_dir)) == 0
    first, last = first_and_last_losses(run_dir)
    assert last < first - 2.0, (first, last)
    final = read_metrics(run_dir)[-1]
    assert final["eval/loss"] < first - 1.5
