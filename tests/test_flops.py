"""FLOP counting: the counter agrees with the analytic GPT count and with the original's DeepSpeed figures,
and counts grouped convolutions' backward right."""

import json

import pytest
import torch
from helpers import preset_config
from torch.utils.flop_counter import FlopCounterMode

from languini.tools.flops import (
    analytic_gpt_forward_flops,
    analytic_gpt_training_flops,
    build_model,
    count_step_flops,
    flop_counter,
    param_counts,
    sdpa_forward_flops,
)
from languini.tools.flops_profile import DEEPSPEED_FORWARD_FLOPS, main
from languini.train_lib.loss import lm_loss


@pytest.mark.parametrize("preset", ["nano", "mini", "tiny", "small", "medium"])
def test_counter_matches_analytic_gpt_count_within_2_percent(preset):
    cfg = preset_config("gpt", preset)
    count = count_step_flops("gpt", cfg, batch_size=2)
    assert count.counted_on == "meta"
    assert count.forward == pytest.approx(analytic_gpt_forward_flops(cfg, 2), rel=0.02)
    assert count.forward_backward == pytest.approx(analytic_gpt_training_flops(cfg, 2), rel=0.02)
    assert count.by_module["(model)"] == (count.forward, count.forward_backward)
    assert count.forward_per_token == count.forward / (2 * cfg.seq_len)


@pytest.mark.parametrize("preset", sorted(DEEPSPEED_FORWARD_FLOPS["gpt"]))
def test_forward_count_is_close_to_the_original_deepspeed_profile(preset):
    ours = count_step_flops("gpt", preset_config("gpt", preset)).forward
    assert ours == pytest.approx(DEEPSPEED_FORWARD_FLOPS["gpt"][preset], rel=0.005)


def test_module_breakdown_adds_up():
    count = count_step_flops("gpt", preset_config("gpt", "mini"))
    parts = ["layers.*.attn.qkv", "layers.*.attn.out", "layers.*.mlp.fc", "layers.*.mlp.proj", "linear"]
    matmuls = sum(count.by_module[p][0] for p in parts)
    attention_products = count.by_module["layers.*.attn"][0] - sum(count.by_module[p][0] for p in parts[:2])
    assert matmuls + attention_products == count.forward
    assert attention_products > 0


@pytest.mark.parametrize("preset, total, non_embedding", [("tiny", 53_912_064, 41_329_152), ("small", 110_615_040, 98_032_128)])
def test_param_counts_follow_the_original_convention(preset, total, non_embedding):
    model = build_model("gpt", preset_config("gpt", preset), "meta")
    assert param_counts(model, 16384) == (total, non_embedding)


def test_profile_command_writes_json(tmp_path, capsys):
    path = tmp_path / "flops.json"
    assert main(["gpt", "small", "--train_batch_size", "1", "--json", str(path)]) == 0
    r = json.loads(path.read_text())
    assert abs(r["analytic_relative_difference"]) < 0.02 and r["deepspeed_forward_per_sequence"] == 109.61e9
    assert r["forward_backward_per_token"] == pytest.approx(3 * r["forward_per_token"], rel=0.02)
    out = capsys.readouterr().out
    assert "OK (tolerance 2%)" in out and "DeepSpeed" in out


def test_modified_config_is_not_compared_with_deepspeed(capsys):
    assert main(["gpt", "small", "--h_dim", "512", "--train_batch_size", "1"]) == 0
    assert "DeepSpeed profiler" not in capsys.readouterr().out


@pytest.mark.parametrize("preset", ["nano", "small"])
def test_causal_convention_halves_the_attention_products(preset):
    """The full convention counts QK^T and AV over all T x T pairs; the causal one half of them."""
    cfg = preset_config("gpt", preset)
    count = count_step_flops("gpt", cfg, batch_size=2)
    products = cfg.n_layers * 2 * (2 * cfg.seq_len**2 * cfg.n_heads * cfg.head_dim) * 2  # two products, batch 2
    assert count.causal_attention_forward == products
    assert count.causal_attention_forward_backward == 3 * products
    assert count.forward_causal == count.forward - products / 2
    assert count.forward_backward_causal == count.forward_backward - 3 * products / 2
    assert count.forward_backward_per_token_causal == count.forward_backward_causal / (2 * cfg.seq_len)


def test_models_without_causal_attention_count_the_same_in_both_conventions():
    count = count_step_flops("lstm", preset_config("lstm", "nano"))
    assert count.causal_attention_forward == 0 and count.forward_backward_causal == count.forward_backward


def test_sdpa_flops_of_uneven_shapes():
    q, k, v = torch.empty(2, 3, 5, 8, device="meta"), torch.empty(2, 3, 7, 8, device="meta"), torch.empty(2, 3, 7, 4, device="meta")
    assert sdpa_forward_flops(q, k, v) == 2 * 6 * 5 * 7 * (8 + 4)


@pytest.mark.parametrize("conv", [torch.nn.functional.conv1d, torch.nn.functional.conv_transpose1d])
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_a_convolution_backward_counts_twice_its_forward_for_any_groups(conv, groups):
    """Input gradient and weight gradient each cost what the forward costs. torch's own formula counts a
    grouped convolution's weight gradient as if dense (6x too many for a depthwise one); ours does not."""
    x = torch.randn(3, 6, 14, requires_grad=True)
    w = torch.randn(6, 6 // groups, 4, requires_grad=True)
    with flop_counter(display=False) as forward:
        conv(x, w, groups=groups)
    with flop_counter(display=False) as both:
        conv(x, w, groups=groups).sum().backward()
    assert forward.get_total_flops() > 0 and both.get_total_flops() == 3 * forward.get_total_flops()
    with FlopCounterMode(display=False) as torch_own:
        conv(x, w, groups=groups).sum().backward()
    assert torch_own.get_total_flops() == (1 + 1 + groups) * forward.get_total_flops()  # what we correct


def test_deltanet_step_counts_its_short_convolutions_right():
    """A whole deltanet step: the three depthwise convolutions per block cost 3x their forward, not the
    dense count torch would give."""
    cfg = preset_config("deltanet", "nano")
    count = count_step_flops("deltanet", cfg)
    inner, conv, blocks, tokens = cfg.n_heads * cfg.head_dim, cfg.conv_size, cfg.n_layers, cfg.seq_len
    conv_forward = blocks * 3 * 2 * tokens * inner * conv
    with FlopCounterMode(display=False) as torch_own:
        model = build_model("deltanet", cfg, "meta")
        x = torch.zeros(1, cfg.seq_len, dtype=torch.long, device="meta")
        lm_loss(model(x, model.get_init_state(1, "meta"))[0], x).backward()
    assert torch_own.get_total_flops() - count.forward_backward == (inner - 1) * conv_forward


@pytest.mark.parametrize("project", ["gpt", "transformerpp"])
def test_the_cpu_fallback_counts_what_the_meta_device_counts(project, monkeypatch):
    """A model the meta device cannot run is counted on real CPU tensors, where attention runs a fused kernel
    torch has no formula for: it is counted all the same, and the causal figures agree too."""
    from languini.tools import flops

    cfg = preset_config(project, "nano")
    on_meta = count_step_flops(project, cfg, batch_size=2)
    real_build = flops.build_model

    def no_meta(project_, cfg_, device):
        if str(device) == "meta":
            raise NotImplementedError("an operation the meta device cannot run")
        return real_build(project_, cfg_, device)

    monkeypatch.setattr(flops, "build_model", no_meta)
    on_cpu = count_step_flops(project, cfg, batch_size=2)
    assert (on_meta.counted_on, on_cpu.counted_on) == ("meta", "cpu")
    assert on_cpu.forward == on_meta.forward and on_cpu.forward_backward == on_meta.forward_backward
    assert on_cpu.forward_backward_causal == on_meta.forward_backward_causal
    assert on_cpu.by_module == on_meta.by_module
