"""torch.compile of the LSTM models on CPU: where the graphs break, and compiled results equal eager ones.

The quasi-LSTM block must be one graph in both forms of the block-parallel scan, including the "matrix"
form that is the default on CUDA (forced here). The classic LSTM's time loop stays out of the compiled
region by design: its block breaks only at that one call, and what is traced does not grow with T.
The default suite compiles with the `aot_eager` backend (Dynamo and AOTAutograd, forward and backward,
without Inductor's code generation, which takes minutes on a small CPU); the slow tests use Inductor.
"""

import functools

import pytest
import torch
from torch._dynamo.utils import counters

import languini.projects.lstm.model as lstm_model
from languini.projects.lstm.configs import Config
from languini.projects.lstm.scans import scan_block_parallel

WITHIN = ["matrix", "steps"]  # "matrix": the CUDA default; "steps": the default elsewhere


def _model(seq_len, **overrides):
    """Two tiny blocks; block_length 4, so T=45 spans 12 blocks with a padded tail, and both scan forms
    recurse over blocks (the "steps" form twice: more blocks than it steps through directly)."""
    torch.manual_seed(0)
    config = Config(
        n_layers=2, h_dim=32, mlp_dim=64, head_dim=8, n_heads=2, vocab_size=50, seq_len=seq_len,
        block_length=4, **overrides,
    )  # fmt: skip
    return lstm_model.Model(config)


def _inputs(model, batch, seq_len):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (batch, seq_len), generator=gen)
    state = [tuple(torch.randn(t.shape, generator=gen) for t in layer)  # non-zero carried state
             for layer in model.get_init_state(batch, torch.device("cpu"))]  # fmt: skip
    return tokens, state


def _step(model, tokens, state):
    """Logits, final state and every parameter gradient of one forward + backward."""
    model.zero_grad()
    logits, new_state = model(tokens, state)
    flat_state = [t for layer in new_state for t in layer]
    loss = logits.square().mean() + sum(t.square().mean() for t in flat_state)  # the state matters too
    loss.backward()
    return [logits.detach(), *(t.detach() for t in flat_state), *(p.grad for p in model.parameters())]


def _compiled_equals_eager(model, tokens, state, **compile_kwargs):
    expected = _step(model, tokens, state)
    for layer in model.layers:  # per block, as `--compile` does (train_lib/compile.py)
        layer.compile(**compile_kwargs)
    got = _step(model, tokens, state)
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.fixture(params=WITHIN)
def within(request, monkeypatch):
    """Forces the quasi-LSTM's scan form on CPU; a fresh Dynamo cache for each test."""
    forced = functools.partial(scan_block_parallel, within=request.param)
    monkeypatch.setattr(lstm_model, "scan_block_parallel", forced)
    torch._dynamo.reset()
    yield request.param
    torch._dynamo.reset()


def test_compiled_quasi_lstm_is_one_graph_and_equals_eager(within):
    """Both blocks run one compiled graph: no graph break (in the block, its scan or the scan's hand-written
    backward) and no recompilation for the second block."""
    model = _model(45)
    counters.clear()
    _compiled_equals_eager(model, *_inputs(model, 2, 45), backend="aot_eager")
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
def test_quasi_lstm_compiled_by_inductor_equals_eager(within):
    model = _model(45)
    _compiled_equals_eager(model, *_inputs(model, 2, 45), fullgraph=True)


def _traced_ops(model, seq_len):
    """(graph breaks, their reasons, ops in all traced graphs) of one classic-LSTM block."""
    torch._dynamo.reset()
    x = torch.randn(2, seq_len, 32)
    state = tuple(torch.zeros(2, 16) for _ in range(2))
    explanation = torch._dynamo.explain(model.layers[0])(x, state)
    n_ops = sum(len(graph.graph.nodes) for graph in explanation.graphs)
    return explanation.graph_break_count, [r.reason for r in explanation.break_reasons], n_ops


def test_classic_lstm_time_loop_stays_out_of_the_compiled_graphs():
    """Breaks only at the disabled recurrence; the traced graphs are the same size at T=4 and T=16."""
    model = _model(64, non_quasi=True)
    breaks, reasons, n_ops_short = _traced_ops(model, 4)
    assert breaks >= 1 and all("torch.compiler.disable" in reason for reason in reasons), reasons
    _, _, n_ops_long = _traced_ops(model, 16)
    assert n_ops_long == n_ops_short  # an unrolled loop would add ops for every step


def test_compiled_classic_lstm_equals_eager():
    torch._dynamo.reset()
    model = _model(64, non_quasi=True)
    _compiled_equals_eager(model, *_inputs(model, 2, 64), backend="aot_eager")


@pytest.mark.slow
def test_classic_lstm_compiled_by_inductor_equals_eager():
    torch._dynamo.reset()
    model = _model(64, non_quasi=True)
    _compiled_equals_eager(model, *_inputs(model, 2, 64))


def test_classic_recurrence_keeps_fp32_under_autocast():
    """The disabled loop turns autocast off itself: a compiled caller may re-enter the loop with the
    caller's autocast active (Dynamo restores context managers around a graph break)."""
    gen = torch.Generator().manual_seed(0)
    gates = torch.randn(5, 2, 3, 16, generator=gen)
    c, h = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    recurrent = torch.randn(2, 4, 16, generator=gen)
    expected = lstm_model._classic_recurrence(gates, c, h, recurrent)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lstm_model._classic_recurrence(gates, c, h, recurrent)
    for a, b in zip(expected, got):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=0, atol=0)
