"""LSTM models: parameter counts, shapes, scan kernels agree, and carried states are exact."""

import dataclasses

import pytest
import torch
from helpers import preset_config

from languini.common_lib.errors import UserError
from languini.projects.lstm.model import Model

CELLS = {
    "quasi": dict(),
    "coupled": dict(coupled=True),
    "classic": dict(non_quasi=True),
}


def _config(**overrides):
    """A model small enough for float64 checks on CPU; block_length 4 so short inputs span blocks."""
    base = dict(
        n_layers=2, h_dim=32, mlp_dim=64, head_dim=8, n_heads=3, vocab_size=50, seq_len=32, block_length=4
    )
    return dataclasses.replace(preset_config("lstm", "nano"), **{**base, **overrides})


def _model(dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    return Model(_config(**overrides)).to(dtype)


def _tokens(batch, length, seed=1):
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(seed))


def _random_state(model, batch, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in layer)
            for layer in model.get_init_state(batch, torch.device("cpu"))]  # fmt: skip


@pytest.mark.parametrize(
    "preset, expected", [("mini", 27_812_864), ("tiny", 55_881_216), ("small", 117_308_928)]
)
def test_quasi_lstm_parameter_counts_match_the_paper(preset, expected):
    with torch.device("meta"):
        model = Model(preset_config("lstm", preset))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_coupled_and_classic_parameter_counts():
    config = preset_config("lstm", "mini")
    n_params = {}
    for name, overrides in CELLS.items():
        with torch.device("meta"):
            n_params[name] = sum(
                p.numel() for p in Model(dataclasses.replace(config, **overrides)).parameters()
            )
    width = config.n_heads * config.head_dim
    per_projection = config.n_layers * (config.h_dim + 1) * width
    assert n_params["quasi"] - n_params["coupled"] == per_projection
    assert (
        n_params["classic"] - n_params["quasi"]
        == config.n_layers * config.n_heads * config.head_dim * 4 * config.head_dim
    )


@pytest.mark.parametrize("cell", CELLS)
def test_forward_shapes_and_zero_initial_state(cell):
    model = _model(torch.float32, **CELLS[cell])
    state = model.get_init_state(3, torch.device("cpu"))
    assert len(state) == 2 and all(t.shape == (3, 24) and not t.any() for layer in state for t in layer)
    logits, new_state = model(_tokens(3, 11), state)
    assert logits.shape == (3, 11, 50)
    assert [tuple(t.shape for t in layer) for layer in new_state] == [((3, 24), (3, 24))] * 2
    logits_none, _ = model(_tokens(3, 11), None)
    assert torch.equal(logits, logits_none)
    for t in (t for layer in new_state for t in layer):  # compact: no view into a [batch, T, N] tensor
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_embedding_is_scaled_and_output_layer_untied_without_bias():
    model = _model(torch.float32)
    assert model.linear.bias is None
    assert model.linear.weight.data_ptr() != model.input_embedding.weight.data_ptr()
    assert not hasattr(model, "position_embedding")
    assert model.layers[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / 2, rel=0.1)


@pytest.mark.parametrize("cell", ["quasi", "coupled"])
def test_block_parallel_model_equals_reference_loop_with_gradients(cell):
    x = _tokens(2, 13)  # 13 steps: not a multiple of block_length 4
    results = []
    for scan in ("torch", "reference"):
        model = _model(scan=scan, **CELLS[cell])
        logits, state = model(x, _random_state(model, 2))
        loss = logits.square().mean() + sum(t.sum() for layer in state for t in layer)
        loss.backward()
        results.append((logits, state, {n: p.grad for n, p in model.named_parameters()}))
    (logits_a, state_a, grads_a), (logits_b, state_b, grads_b) = results
    assert (logits_a - logits_b).abs().max() < 1e-9
    for layer_a, layer_b in zip(state_a, state_b):
        for a, b in zip(layer_a, layer_b):
            assert (a - b).abs().max() < 1e-9
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert (grads_a[name] - grads_b[name]).abs().max() < 1e-9, name


def test_block_parallel_model_equals_reference_loop_in_float32():
    x = _tokens(2, 21)
    outs = []
    for scan in ("torch", "reference"):
        model = _model(torch.float32, scan=scan)
        logits, _ = model(x, None)
        logits.square().mean().backward()
        outs.append((logits, model.layers[0].rnn.gates.weight.grad))
    assert (outs[0][0] - outs[1][0]).abs().max() < 1e-5
    assert (outs[0][1] - outs[1][1]).abs().max() < 1e-5


@pytest.mark.parametrize("cell", CELLS)
def test_carried_state_makes_two_halves_equal_one_whole(cell):
    """Length 2L in one call == two calls of length L with the state carried (gradients flow through)."""
    model = _model(**CELLS[cell])
    x = _tokens(2, 18)
    state = _random_state(model, 2)
    whole, whole_state = model(x, state)
    first, mid_state = model(x[:, :9], state)
    second, end_state = model(x[:, 9:], mid_state)
    assert (whole - torch.cat([first, second], dim=1)).abs().max() < 1e-10
    for layer_a, layer_b in zip(whole_state, end_state):
        for a, b in zip(layer_a, layer_b):
            assert (a - b).abs().max() < 1e-10


@pytest.mark.parametrize("cell", CELLS)
def test_state_carries_information(cell):
    """A different initial state changes the outputs: the state is really used."""
    model = _model(**CELLS[cell])
    x = _tokens(2, 5)
    zero, _ = model(x, None)
    other, _ = model(x, _random_state(model, 2))
    assert (zero - other).abs().max() > 1e-4


@pytest.mark.parametrize("cell", CELLS)
def test_outputs_are_causal(cell):
    model = _model(**CELLS[cell])
    x = _tokens(1, 12)
    y = x.clone()
    y[0, 7] = (y[0, 7] + 1) % 50
    a, _ = model(x, None)
    b, _ = model(y, None)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.equal(a[:, 7:], b[:, 7:])


def test_coupled_classic_combination_is_rejected():
    with pytest.raises(UserError):
        _model(coupled=True, non_quasi=True)


def test_recurrence_stays_fp32_under_autocast():
    model = _model(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, state = model(_tokens(2, 9), None)
    assert all(t.dtype == torch.float32 for layer in state for t in layer)
    assert torch.isfinite(logits).all()


def test_classic_lstm_without_recurrent_weights_is_the_quasi_lstm():
    """Same gate layout and equations; the recurrent terms are the only difference."""
    classic, quasi = _model(non_quasi=True), _model()
    quasi.load_state_dict({k: v for k, v in classic.state_dict().items() if not k.endswith("recurrent")})
    x = _tokens(2, 10)
    assert (classic(x, None)[0] - quasi(x, None)[0]).abs().max() > 1e-6
    with torch.no_grad():
        for layer in classic.layers:
            layer.rnn.recurrent.zero_()
    assert (classic(x, None)[0] - quasi(x, None)[0]).abs().max() < 1e-10


def test_classic_lstm_heads_only_feed_themselves():
    """With recurrent weights only in head 0, the cell output of every other head ignores them."""
    classic, quasi = _model(non_quasi=True), _model()
    with torch.no_grad():
        for layer in classic.layers:
            layer.rnn.recurrent[1:].zero_()
    quasi.load_state_dict({k: v for k, v in classic.state_dict().items() if not k.endswith("recurrent")})
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    state = _random_state(classic, 2)[0]
    out_classic, (c_classic, _) = classic.layers[0].rnn(x, state)
    out_quasi, (c_quasi, _) = quasi.layers[0].rnn(x, state)
    head_dim = 8
    assert (c_classic[:, :head_dim] - c_quasi[:, :head_dim]).abs().max() > 1e-6
    assert (c_classic[:, head_dim:] - c_quasi[:, head_dim:]).abs().max() < 1e-12


def test_embedding_enters_the_first_block_scaled_by_sqrt_h_dim():
    model = _model()
    seen = []
    model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = _tokens(2, 6)
    model(x, None)
    torch.testing.assert_close(seen[0], model.input_embedding(x) * 32**0.5, rtol=0, atol=0)


def test_classic_lstm_at_one_head_is_torch_lstm():
    """One head of the classic cell is a standard LSTM: same outputs and final (h, c) as torch.nn.LSTM with
    the weights mapped (our gate order f, i, z, o with +1 on f; torch's i, f, g, o; no recurrent bias)."""
    dim = 8
    cell = _model(non_quasi=True, h_dim=dim, head_dim=dim, n_heads=1, n_layers=1).layers[0].rnn
    with torch.no_grad():
        cell.post_head.weight.copy_(torch.eye(dim, dtype=torch.float64))
        cell.post_head.bias.zero_()
    f, i, z, o = cell.gates.weight.detach().chunk(4)
    bf, bi, bz, bo = cell.gates.bias.detach().chunk(4)
    rf, ri, rz, ro = cell.recurrent.detach()[0].T.chunk(4)  # recurrent[0] is [dim, 4 dim]: h @ R
    reference = torch.nn.LSTM(dim, dim, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        reference.weight_ih_l0.copy_(torch.cat([i, f, z, o]))
        reference.bias_ih_l0.copy_(torch.cat([bi, bf + 1.0, bz, bo]))
        reference.weight_hh_l0.copy_(torch.cat([ri, rf, rz, ro]))
        reference.bias_hh_l0.zero_()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 11, dim, generator=gen, dtype=torch.float64)
    c0, h0 = (torch.randn(2, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    out, (c, h) = cell(x, (c0, h0))
    expected, (h_ref, c_ref) = reference(x, (h0[None], c0[None]))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((c, h), (c_ref[0], h_ref[0]), rtol=1e-12, atol=1e-12)
