"""The block-parallel quasi-LSTM scan equals the step-by-step loop: outputs and all gradients."""

import pytest
import torch
from helpers import load_benchmark
from torch.utils.flop_counter import FlopCounterMode

from languini.projects.lstm import scans
from languini.projects.lstm.scans import scan_block_parallel, scan_reference

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}


def _inputs(batch, length, width, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f = torch.sigmoid(torch.randn(batch, length, width, generator=gen, dtype=dtype) * 2 + 1)
    u = torch.randn(batch, length, width, generator=gen, dtype=dtype)
    c0 = torch.randn(batch, width, generator=gen, dtype=dtype)  # non-zero initial state
    weight = torch.randn(batch, length, width, generator=gen, dtype=dtype)  # makes every output matter
    return [t.requires_grad_() for t in (f, u, c0)], weight


def _value_and_grads(scan, inputs, weight):
    c = scan(*inputs)
    return (c, *torch.autograd.grad((c * weight).sum(), inputs))


WITHIN = ["matrix", "steps"]  # how a block's own steps are computed: log-space products, or stepping


@pytest.mark.parametrize("within", WITHIN)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "length, block_length",
    [(16, 16), (64, 16), (50, 16), (7, 16), (37, 5), (24, 8), (9, 1), (33, 32), (300, 4)],
)
def test_block_parallel_equals_reference(dtype, length, block_length, within):
    inputs, weight = _inputs(3, length, 10, dtype)
    expected = _value_and_grads(scan_reference, inputs, weight)
    got = _value_and_grads(
        lambda f, u, c0: scan_block_parallel(f, u, c0, block_length, within), inputs, weight
    )
    for name, a, b in zip(["c", "grad f", "grad u", "grad c0"], expected, got):
        assert a.shape == b.shape and a.dtype == b.dtype
        err = (a - b).abs().max().item()
        assert err <= TOLERANCE[dtype], f"{name}: max abs error {err:.3g} at {dtype}"


@pytest.mark.parametrize("within", WITHIN)
def test_uniform_forget_gates_down_to_zero_stay_accurate(within):
    """Forget gates anywhere in (0, 1), including tiny ones, still match: no division by f anywhere."""
    inputs, weight = _inputs(2, 40, 6, torch.float32, seed=1)
    with torch.no_grad():
        inputs[0].uniform_(0, 1)[:, ::7] = 1e-30
    expected = _value_and_grads(scan_reference, inputs, weight)
    got = _value_and_grads(lambda f, u, c0: scan_block_parallel(f, u, c0, 8, within), inputs, weight)
    for a, b in zip(expected, got):
        assert torch.isfinite(b).all()
        assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("within", WITHIN)
def test_long_sequences_do_not_underflow_or_overflow(within):
    """512 steps of strong forgetting: products reach far below fp32 range without inf or nan."""
    f = torch.full((1, 512, 4), 0.05)
    u = torch.ones(1, 512, 4)
    c = scan_block_parallel(f, u, torch.zeros(1, 4), 16, within)
    assert torch.isfinite(c).all()
    assert torch.allclose(c[:, -1], torch.full((1, 4), 1 / 0.95), atol=1e-5)  # fixed point u / (1 - f)


@pytest.mark.gpu
def test_block_parallel_on_cuda_with_tf32_enabled_equals_reference():  # the default on CUDA: "matrix"
    """The trainer turns TF32 on; the scan's matmuls must still run at full fp32 precision."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    inputs, weight = _inputs(4, 300, 64, torch.float32)
    inputs = [t.detach().cuda().requires_grad_() for t in inputs]
    weight = weight.cuda()
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        expected = _value_and_grads(scan_reference, inputs, weight)
        got = _value_and_grads(lambda f, u, c0: scan_block_parallel(f, u, c0, 16), inputs, weight)
        assert torch.backends.cuda.matmul.allow_tf32  # restored after the scan
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    for a, b in zip(expected, got):
        assert (a - b).abs().max().item() <= 1e-5


def test_unknown_within_mode_is_rejected():
    inputs, _ = _inputs(1, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="within"):
        scan_block_parallel(*inputs, 2, "diagonal")


def test_segment_sums_operator_is_a_full_matmul_with_a_correct_fake():
    """The matrix form's one matmul is a custom operator (opaque to torch.compile): schema, fake
    (meta) version and AOT tracing pass torch's own checks, and it is exactly the matmul."""
    selector, _ = scans._segment_sum_operands(4, torch.float32, torch.device("cpu"))
    log_f = torch.log(torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0)))
    torch.library.opcheck(scans._segment_sums, (selector, log_f))
    assert torch.equal(scans._segment_sums(selector, log_f), torch.matmul(selector, log_f))


@pytest.mark.parametrize("within", WITHIN)
def test_scan_counts_no_flops_and_runs_on_meta(within):
    """The scan is elementwise work, which the FLOP counter does not count, in either form (the matrix
    form's matmul is inside the custom operator); meta tensors give meta results of the right shape."""
    inputs, weight = _inputs(2, 37, 6, torch.float32)
    with FlopCounterMode(display=False) as counter:
        _value_and_grads(lambda f, u, c0: scan_block_parallel(f, u, c0, 4, within), inputs, weight)
    assert counter.get_total_flops() == 0
    f, u, c0 = (t.detach().to("meta") for t in inputs)
    c = scan_block_parallel(f, u, c0, 4, within)
    assert c.device.type == "meta" and c.shape == f.shape


def test_scan_speed_counts_each_tensor_at_its_own_element_size():
    """benchmarks/scan_speed.py with bf16 f and u: the reference loop returns fp32 c, and grad_c is fp32."""
    scan_speed = load_benchmark("scan_speed")
    shape, n = (2, 5, 3), 2 * 5 * 3
    inputs = {"f": torch.rand(shape).bfloat16(), "u": torch.randn(shape).bfloat16(), "c0": torch.randn(2, 3),
              "grad_c": torch.randn(shape)}  # fmt: skip
    forward, backward = scan_speed.traffic_bytes(scan_reference, inputs)
    assert forward == (2 + 2 + 4) * n  # f, u read (bf16), c written (fp32)
    assert backward == (2 + 4 + 4 + 2 + 2) * n  # f, c, grad_c read; grad_f, grad_u written
