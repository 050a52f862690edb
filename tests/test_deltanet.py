"""The gated DeltaNet project: chunked delta rule == step-by-step loop (values and all gradients), carried
state including the convolution caches, FLOPs, parameter counts, and training through the real trainer."""

import dataclasses
import functools
import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    REPO_ROOT,
    check_stateful_sigkill_resume,
    check_two_processes_equal_accumulation,
    exit_code,
    first_and_last_losses,
    nano_demo_args,
    tiny_run_args,
    write_bigram_corpus,
)

from languini.common_lib.errors import UserError
from languini.dataset_lib.languini_books import stream_indices
from languini.projects import load_project
from languini.projects.deltanet import main as deltanet_main
from languini.projects.deltanet.model import Block, DeltaRule
from languini.projects.deltanet.scans import delta_rule_chunked, delta_rule_reference
from languini.tools import flops_profile, steps
from languini.tools.flops import flop_counter
from languini.train_lib.checkpoint import load_checkpoint
from languini.train_lib.loggers import read_metrics

SPEC = load_project("deltanet")
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread
DELTANET_MAIN = os.path.join(REPO_ROOT, "languini", "projects", "deltanet", "main.py")
HAS_FLA = importlib.util.find_spec("fla") is not None
GPT_PARAMS = {
    "mini": 27_549_696, "tiny": 53_912_064, "small": 110_615_040, "medium": 336_390_144,
    "large": 731_077_632, "XL": 1_478_160_384,
}  # fmt: skip
PARAMS = {
    "nano": 1_464_016, "mini": 27_312_832, "tiny": 53_595_232, "small": 110_452_512, "medium": 339_823_872,
    "large": 731_509_248, "XL": 1_486_035_072,
}  # fmt: skip

# ---------------------------------------------------------------------------------------------------
# The delta rule: chunked == reference


def scan_inputs(batch, heads, length, dk, dv, dtype, seed=0, gate=True, state=True, decay_scale=1.0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q = randn(batch, heads, length, dk)
    k = F.normalize(randn(batch, heads, length, dk), dim=-1)
    v = randn(batch, heads, length, dv)
    beta = torch.sigmoid(randn(batch, heads, length))
    g = (
        -F.softplus(randn(batch, heads, length)) * decay_scale
        if gate
        else torch.zeros(batch, heads, length, dtype=dtype)
    )
    s0 = randn(batch, heads, dk, dv) if state else None
    return [t.requires_grad_() if t is not None else None for t in (q, k, v, beta, g, s0)]


def values_and_grads(scan, inputs, seed=1):
    out, final = scan(*inputs)
    gen = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=gen, dtype=out.dtype)  # makes every output matter
    w_state = torch.randn(final.shape, generator=gen, dtype=out.dtype)
    leaves = [t for t in inputs if t is not None]
    grads = torch.autograd.grad((out * w_out).sum() + (final * w_state).sum(), leaves)
    return [out, final, *grads]


NAMES = ["out", "final state", "grad q", "grad k", "grad v", "grad beta", "grad g", "grad initial state"]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}  # relative to max(1, largest value)


def assert_scans_agree(inputs, chunk_size, dtype):
    expected = values_and_grads(delta_rule_reference, inputs)
    got = values_and_grads(lambda *a: delta_rule_chunked(*a, chunk_size=chunk_size), inputs)
    assert len(got) == len(expected)
    worst = 0.0
    for name, a, b in zip(NAMES, expected, got):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.isfinite(b).all(), name
        err = ((a - b).abs().max() / a.abs().max().clamp(min=1)).item()
        assert err <= TOLERANCE[dtype], f"{name}: error {err:.3g} at {dtype}, chunk {chunk_size}"
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "length, chunk_size",
    [(64, 64), (37, 16), (100, 64), (5, 64), (33, 1), (50, 7), (1, 4), (96, 32), (24, 3)],
)
def test_chunked_equals_reference(dtype, length, chunk_size):
    """Outputs, final state and the gradients of q, k, v, beta, g and a non-zero initial state."""
    assert_scans_agree(scan_inputs(2, 3, length, 6, 5, dtype), chunk_size, dtype)


@pytest.mark.parametrize("length, chunk_size", [(40, 16), (64, 64), (9, 4)])
def test_chunked_equals_reference_without_decay(length, chunk_size):
    """g = 0: the plain delta rule."""
    assert_scans_agree(
        scan_inputs(2, 2, length, 4, 7, torch.float64, seed=3, gate=False), chunk_size, torch.float64
    )


def test_chunked_equals_reference_from_the_default_zero_state():
    inputs = scan_inputs(1, 2, 30, 4, 4, torch.float64, seed=4, state=False)
    assert_scans_agree(inputs, 8, torch.float64)
    out, final = delta_rule_chunked(*inputs[:5], chunk_size=8)
    zeros = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(out, delta_rule_chunked(*inputs[:5], zeros, chunk_size=8)[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_strong_decay_over_long_chunks_stays_finite_and_exact(dtype):
    """Log-decays down to about -40 per step over chunks of 64: products far below the float range."""
    assert_scans_agree(scan_inputs(1, 2, 130, 4, 4, dtype, seed=5, decay_scale=20.0), 64, dtype)


def test_plain_delta_rule_is_the_written_recurrence():
    """g = 0 gives S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T, o_t = S_t^T q_t, per head."""
    q, k, v, beta, g, s0 = (t.detach() for t in scan_inputs(1, 1, 6, 3, 2, torch.float64, seed=6, gate=False))
    state = s0[0, 0].clone()
    for t in range(6):
        kt = k[0, 0, t]
        state = state + beta[0, 0, t] * torch.outer(kt, v[0, 0, t] - state.T @ kt)
        expected_out = state.T @ q[0, 0, t]
    out, final = delta_rule_chunked(q, k, v, beta, g, s0, chunk_size=4)
    torch.testing.assert_close(final[0, 0], state, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[0, 0, -1], expected_out, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# The model


def small_config(**overrides):
    fields = dict(
        vocab_size=64, seq_len=40, n_layers=2, h_dim=32, head_dim=8, n_heads=2, mlp_dim=48, chunk_size=16,
        device="cpu",
    )  # fmt: skip
    return dataclasses.replace(SPEC.preset_config("nano"), **{**fields, **overrides})


def build(cfg):
    torch.manual_seed(0)
    return SPEC.Model(cfg).double().eval()


def tokens(batch, length, seed=0):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def run_in_pieces(model, x, pieces):
    state, outs = model.get_init_state(x.shape[0], "cpu"), []
    start = 0
    for n in pieces:
        logits, state = model(x[:, start : start + n], state)
        outs.append(logits)
        start += n
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("kernel", ["torch", "reference"])
@pytest.mark.parametrize("gate", [True, False])
def test_carried_state_and_conv_caches_equal_one_call(kernel, gate):
    """Pieces shorter than the convolution kernel, and not whole chunks, carried through the state."""
    model = build(small_config(kernel=kernel, gate=gate))
    x = tokens(3, 40)
    with torch.no_grad():
        whole, whole_state = run_in_pieces(model, x, [40])
        pieces, pieces_state = run_in_pieces(model, x, [2, 1, 20, 17])
    torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-10)
    for layer_a, layer_b in zip(pieces_state, whole_state):
        for a, b in zip(layer_a, layer_b):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("part", ["recurrent state", "q conv cache", "k conv cache", "v conv cache"])
def test_every_part_of_the_state_matters(part):
    model = build(small_config())
    x = tokens(2, 40)
    index = ["recurrent state", "q conv cache", "k conv cache", "v conv cache"].index(part)
    with torch.no_grad():
        _, state = model(x[:, :20], model.get_init_state(2, "cpu"))
        carried, _ = model(x[:, 20:], state)
        assert all(layer[index].abs().max() > 0 for layer in state)
        dropped = [
            tuple(torch.zeros_like(t) if i == index else t for i, t in enumerate(layer)) for layer in state
        ]
        without, _ = model(x[:, 20:], dropped)
    assert (carried[:, 0] - without[:, 0]).abs().max() > 1e-6  # the first token after the cut already differs


def test_init_state_shapes():
    cfg = small_config(conv_size=3)
    state = build(cfg).get_init_state(5, "cpu")
    assert len(state) == cfg.n_layers
    inner = cfg.n_heads * cfg.head_dim
    for layer in state:
        assert [tuple(t.shape) for t in layer] == [(5, 2, 8, 8), (5, inner, 2), (5, inner, 2), (5, inner, 2)]
        assert all(t.dtype == torch.float64 and not t.any() for t in layer)
    assert SPEC.Model(cfg).get_init_state(1, "cpu")[0][0].dtype == torch.float32


def test_torch_kernel_equals_reference_kernel_in_the_model_with_gradients():
    x = tokens(2, 40, seed=1)
    results = []
    for kernel in ("torch", "reference"):
        model = build(small_config(kernel=kernel))
        logits, _ = model(x, model.get_init_state(2, "cpu"))
        grads = torch.autograd.grad(logits.square().mean(), list(model.parameters()))
        results.append((logits, grads))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-10)


def test_layer_feeds_the_scan_normalised_scaled_queries_and_decays_in_range(monkeypatch):
    seen = {}

    def capture(self, q, k, v, beta, g, state):
        seen.update(q=q, k=k, beta=beta, g=g)
        return v, state

    monkeypatch.setattr(DeltaRule, "forward", capture)
    model = build(small_config())
    with torch.no_grad():
        model(tokens(2, 40), None)
    d = 8
    # unit length per head (up to the eps of x / sqrt(|x|^2 + 1e-6)), q then scaled by 1/sqrt(head_dim)
    for name, length in (("k", 1.0), ("q", d**-0.5)):
        norms = seen[name].norm(dim=-1) / length
        assert seen[name].shape == (2, 2, 40, d) and ((norms > 0.99) & (norms <= 1)).all(), name
    assert ((seen["beta"] > 0) & (seen["beta"] < 1)).all()
    assert (seen["g"] <= 0).all() and (seen["g"] < 0).any()
    mixer = model.layers[0].mixer
    assert ((mixer.A_log.exp() >= 1) & (mixer.A_log.exp() <= 16)).all()
    dt = F.softplus(mixer.dt_bias)
    assert ((dt >= 1e-3 - 1e-9) & (dt <= 1e-1 + 1e-9)).all()


def test_no_gate_is_the_plain_delta_rule_without_decay_parameters():
    model = SPEC.Model(small_config(gate=False))
    parts = {part for name, _ in model.named_parameters() for part in name.split(".")}
    assert not parts & {"a_proj", "A_log", "dt_bias"} and "beta_proj" in parts
    gated = {part for name, _ in SPEC.Model(small_config()).named_parameters() for part in name.split(".")}
    assert gated - parts == {"a_proj", "A_log", "dt_bias"}
    cfg = SPEC.parse_config(["nano", "--no-gate"], "main.py")
    assert cfg.gate is False and SPEC.preset_config("nano").gate is True


def test_no_biases_and_per_block_layers():
    with torch.device("meta"):
        model = SPEC.Model(SPEC.preset_config("mini"))
    assert not any(name.endswith("bias") and "dt_bias" not in name for name, _ in model.named_parameters())
    assert isinstance(model.layers, torch.nn.ModuleList) and len(model.layers) == 4
    assert model.linear.weight is not model.input_embedding.weight


@pytest.mark.slow
def test_compiled_blocks_equal_eager():
    """Per-block torch.compile (as --compile does; aot_eager traces the same graphs without building
    kernels): same logits, state and gradients, the hand-written convolution backward included."""
    eager = build(small_config())
    compiled = build(small_config())
    for layer in compiled.layers:
        layer.compile(backend="aot_eager")
    x = tokens(2, 40)
    results = []
    for model in (eager, compiled):
        logits, state = model(x, model.get_init_state(2, "cpu"))
        grads = torch.autograd.grad(logits.square().mean(), list(model.parameters()))
        results.append((logits, [t for layer in state for t in layer], grads))
    for a, b in zip(*[[r[0], *r[1], *r[2]] for r in results]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_bf16_autocast_keeps_the_state_in_fp32():
    model = SPEC.Model(small_config())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, state = model(tokens(2, 40), model.get_init_state(2, "cpu"))
    assert torch.isfinite(logits.float()).all()
    assert all(t.dtype == torch.float32 for layer in state for t in layer)


@pytest.mark.parametrize("preset", PARAMS)
def test_parameter_counts_match_gpt_within_ten_percent(preset):
    with torch.device("meta"):
        count = sum(p.numel() for p in SPEC.Model(SPEC.preset_config(preset)).parameters())
        gpt = load_project("gpt")
        gpt_count = sum(p.numel() for p in gpt.Model(gpt.preset_config(preset)).parameters())
    assert count == PARAMS[preset]  # the figures in the project's README
    assert gpt_count == GPT_PARAMS.get(preset, gpt_count)
    assert abs(count / gpt_count - 1) < 0.10, (preset, count, gpt_count)
    for field in ("n_layers", "h_dim", "head_dim", "n_heads", "seq_len", "vocab_size"):
        assert getattr(SPEC.preset_config(preset), field) == getattr(gpt.preset_config(preset), field), field


# ---------------------------------------------------------------------------------------------------
# The flash-linear-attention kernel


@pytest.mark.skipif(HAS_FLA, reason="flash-linear-attention is installed")
def test_fla_kernel_without_the_package_is_a_one_line_error(capsys, tmp_path):
    with pytest.raises(UserError, match="flash-linear-attention"):
        SPEC.Model(small_config(kernel="fla"))
    assert exit_code(deltanet_main.main, ["nano", "--kernel", "fla", "--run_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --kernel fla needs") and "\n" not in err


@pytest.mark.skipif(not HAS_FLA, reason="needs flash-linear-attention")
def test_fla_kernel_refuses_the_cpu():
    model = SPEC.Model(small_config(kernel="fla"))
    with pytest.raises(UserError, match="CUDA only"):
        model(tokens(1, 8), None)


@pytest.mark.gpu
def test_fla_kernel_equals_the_chunked_form_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not HAS_FLA:
        pytest.skip("needs flash-linear-attention (pip install -e '.[fla]')")
    torch.manual_seed(0)
    batch, heads, length, d = 2, 4, 200, 64  # not a multiple of fla's chunk of 64
    q, k, v, beta, g, s0 = (
        t.detach() for t in scan_inputs(batch, heads, length, d, d, torch.float32, seed=7)
    )
    q = q * d**-0.5
    # the fla kernel takes bf16 q, k, v, beta: compare both on the same rounded values
    q, k, v, beta = (t.to(torch.bfloat16).float() for t in (q, k, v, beta))
    leaves = [t.cuda().requires_grad_() for t in (q, k, v, beta, g, s0)]
    out_fla, state_fla = DeltaRule("fla")(*leaves)
    out_ref, state_ref = DeltaRule("torch")(*leaves)
    scale = out_ref.abs().max()
    assert (out_fla.float() - out_ref).abs().max() <= 2e-2 * scale
    assert (state_fla.float() - state_ref).abs().max() <= 2e-2 * state_ref.abs().max()
    weight = torch.randn_like(out_ref)
    grads_fla = torch.autograd.grad((out_fla.float() * weight).sum() + state_fla.float().sum(), leaves)
    grads_ref = torch.autograd.grad((out_ref * weight).sum() + state_ref.sum(), leaves)
    for name, a, b in zip(["q", "k", "v", "beta", "g", "initial state"], grads_fla, grads_ref):
        assert torch.isfinite(a).all(), name
        assert (a.float() - b).abs().max() <= 5e-2 * b.abs().max(), name


# ---------------------------------------------------------------------------------------------------
# FLOPs


def block_flops(cfg, batch, length):
    with torch.device("meta"):
        block = Block(cfg)
        x = torch.randn(batch, length, cfg.h_dim)
        state = SPEC.Model(dataclasses.replace(cfg, n_layers=1)).get_init_state(batch, "meta")[0]
    with flop_counter(display=False) as counter:
        block(x, state)
    return counter.get_total_flops()


@pytest.mark.parametrize("kernel, length", [("torch", 512), ("torch", 100), ("reference", 100)])
def test_flop_counter_matches_a_hand_count_of_one_block(kernel, length):
    """One block of `small`, forward. Matmuls: q, k, v, beta, decay, output-gate and output projections,
    the SwiGLU, and the depthwise convolutions (2 FLOPs per multiply-add). The delta rule:
    - chunked (chunk C, the sequence padded to N whole chunks), per head and chunk: k k^T and q k^T
      (C x C x Dk each), then in the loop over chunks W S, (exp(G) q) S and the state update k^T U
      (C x Dk x Dv each) and the intra-chunk scores times U (C x C x Dv); the triangular solve is not
      a matmul and is not counted;
    - reference, per head and step: the recall S^T k, the rank-1 update k u^T and the read-out S^T q."""
    cfg = dataclasses.replace(SPEC.preset_config("small"), kernel=kernel)
    batch, h, heads, d, f, conv = 2, cfg.h_dim, cfg.n_heads, cfg.head_dim, cfg.mlp_dim, cfg.conv_size
    inner = heads * d
    tokens_ = batch * length
    projections = 2 * tokens_ * (h * 3 * inner + h * heads + h * heads + h * inner + inner * h)
    convolutions = 2 * tokens_ * 3 * inner * conv
    mlp = 2 * tokens_ * (h * 2 * f + f * h)
    if kernel == "torch":
        c = cfg.chunk_size
        chunks = math.ceil(length / c)
        per_chunk = 2 * (2 * c * c * d) + 3 * (2 * c * d * d) + 2 * c * c * d
        delta_rule = batch * heads * chunks * per_chunk
    else:
        delta_rule = batch * heads * length * 3 * (2 * d * d)
    assert block_flops(cfg, batch, length) == projections + convolutions + mlp + delta_rule


def test_flops_profile_and_flop_budget_steps_run(capsys):
    assert flops_profile.main(["deltanet", "nano", "--train_batch_size", "1"]) == 0
    out = capsys.readouterr().out
    assert "deltanet nano" in out and "layers.*.mixer.delta_rule" in out
    assert steps.main(["deltanet", "nano", "--flops", "1e15", "--train_batch_size", "8"]) == 0
    out = capsys.readouterr().out
    assert "--max_train_steps" in out


@pytest.mark.slow
def test_flops_profile_of_small():
    result = flops_profile.profile("deltanet", SPEC.preset_config("small"))
    assert result["forward_per_sequence"] == pytest.approx(103.82e9, rel=1e-3)
    assert result["forward_backward_per_sequence"] == pytest.approx(
        312.37e9, rel=1e-3
    )  # about 3x the forward


# ---------------------------------------------------------------------------------------------------
# Training through the real trainer


TINY = [
    "--n_layers", "1", "--h_dim", "32", "--head_dim", "8", "--n_heads", "2", "--mlp_dim", "64", "--seq_len", "10",
    "--chunk_size", "4",
]  # fmt: skip


def tiny_args(data_root, run_dir, steps_, *extra):
    return tiny_run_args("deltanet", data_root, run_dir, steps_, *TINY, *extra)


def run_main(argv) -> int:
    return exit_code(deltanet_main.main, argv)


def states_by_stream(checkpoint, global_batch: int, micro_batches: int) -> dict[int, list]:
    """Carried state of each global stream: {stream: [per-layer tuple]} from a checkpoint's states."""
    world = len(checkpoint["states"])
    out = {}
    for rank, rank_states in enumerate(checkpoint["states"]):
        assert len(rank_states) == micro_batches  # one state per micro-batch, never shared
        streams = stream_indices(rank, world, global_batch)
        rows = len(streams) // micro_batches
        for m, state in enumerate(rank_states):
            for row, stream in enumerate(streams[m * rows : (m + 1) * rows]):
                out[stream] = [tuple(t[row] for t in layer) for layer in state]
    return out


def test_two_processes_equal_one_process_with_accumulation(synthetic_corpus, tmp_path):
    """2 gloo ranks x 1 micro-step == 1 rank x 2 micro-steps: losses, gradient norms and carried states."""
    data_root, _ = synthetic_corpus
    make_args = functools.partial(tiny_args, data_root)
    ddp_dir, acc_dir = check_two_processes_equal_accumulation(DELTANET_MAIN, run_main, make_args, tmp_path, tol=1e-4)
    ddp_states = states_by_stream(load_checkpoint(str(ddp_dir / "checkpoints" / "latest.pt")), 4, 1)
    acc_states = states_by_stream(load_checkpoint(str(acc_dir / "checkpoints" / "latest.pt")), 4, 2)
    assert sorted(ddp_states) == sorted(acc_states) == [0, 1, 2, 3]
    for stream, layers in acc_states.items():
        for layer_acc, layer_ddp in zip(layers, ddp_states[stream]):
            for a, b in zip(layer_acc, layer_ddp):  # recurrent state and the three convolution caches
                assert a.abs().max() > 0  # really carried, not reset to zeros
                torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


def test_resume_after_sigkill_is_bit_identical_including_states(synthetic_corpus, tmp_path):
    checkpoint = check_stateful_sigkill_resume("deltanet", run_main, tiny_args, synthetic_corpus[0], tmp_path)
    assert all(t.abs().max() > 0 for micro in checkpoint["states"][0] for layer in micro for t in layer)


@pytest.mark.parametrize("gate", [True, False])
def test_loss_drops_on_learnable_corpus(tmp_path, gate):
    data_root = tmp_path / "bigram"
    write_bigram_corpus(data_root)
    run_dir = tmp_path / "run"
    args = tiny_args(
        data_root, run_dir, 100, "--max_lr", "1e-2", "--seq_len", "16", *([] if gate else ["--no-gate"])
    )
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
