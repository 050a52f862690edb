import dataclasses

import pytest
import torch
from helpers import preset_config

from languini.projects.gpt.model import Model

PUBLISHED = {
    "mini": 27_549_696,
    "tiny": 53_912_064,
    "small": 110_615_040,
    "medium": 336_390_144,
    "large": 731_077_632,
    "XL": 1_478_160_384,
}


@pytest.mark.parametrize("preset, count", PUBLISHED.items())
def test_parameter_counts_match_the_paper(preset, count):
    with torch.device("meta"):
        model = Model(preset_config("gpt", preset))
    assert sum(p.numel() for p in model.parameters()) == count


def tiny_config(**kw):
    base = dict(n_layers=2, h_dim=32, mlp_dim=64, head_dim=8, n_heads=3, seq_len=16, vocab_size=50)
    return dataclasses.replace(preset_config("gpt", "nano"), **{**base, **kw})


def test_forward_shapes_and_stateless():
    model = Model(tiny_config())
    x = torch.randint(0, 50, (3, 16))
    assert model.get_init_state(3, "cpu") is None
    logits, state = model(x, None)
    assert logits.shape == (3, 16, 50) and state is None
    assert model(x[:, :5], None)[0].shape == (3, 5, 50)  # shorter sequences work too


def test_attention_is_causal():
    torch.manual_seed(0)
    model = Model(tiny_config()).eval()
    x = torch.randint(0, 50, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 50
    with torch.no_grad():
        a, b = model(x, None)[0], model(y, None)[0]
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_init_follows_the_recipe():
    torch.manual_seed(0)
    c = tiny_config(n_layers=8, h_dim=256, mlp_dim=1024)
    model = Model(c)
    assert abs(model.layers[0].mlp.fc.weight.std().item() - 0.02) < 2e-3
    assert abs(model.layers[0].mlp.proj.weight.std().item() - 0.02 / (2 * 8) ** 0.5) < 1e-3
    assert model.layers[0].attn.qkv.bias.abs().max() == 0
    assert model.linear.bias is None


def test_embedding_enters_the_first_block_scaled_by_sqrt_h_dim_plus_positions():
    model = Model(tiny_config())
    seen = []
    model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.randint(0, 50, (2, 7))
    model(x, None)
    expected = model.input_embedding(x) * 32**0.5 + model.position_embedding(torch.arange(7))
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)
