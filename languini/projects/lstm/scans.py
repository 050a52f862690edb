"""The quasi-LSTM recurrence c_t = f_t * c_{t-1} + u_t (elementwise), computed two ways.

`scan_reference` is the plain step-by-step loop: the definition, kept to test the fast path against.
`scan_block_parallel` splits time into blocks of `block_length` steps. Each block acts on the c that
enters it as one step, c_out = (f_1 ... f_L) c_in + (its result from c_in = 0), so the c entering every
block follows the same recurrence one level up, over blocks, and is scanned by the same function:
T steps take about log_L(T) levels instead of T sequential steps. A block's own steps are computed
one of two ways, with the same result:
- "matrix" (the default on CUDA): all steps at once. Every product of forget gates f_{s+1} ... f_t is
  taken in log space, a sum of log f over the causal lower triangle (one GEMM with a 0/1 selector),
  then exponentiated; every exponent is <= 0 (log f <= 0, non-causal pairs are masked to -inf before
  exp), so nothing overflows and nothing is divided by a small number. A block is a few batched ops.
- "steps" (the default elsewhere): the L steps of a block in sequence, for all blocks at once. On a CPU
  a small op costs microseconds, not a kernel launch, and the matrix form's L x L exps per block cost
  more than they save: measured, "steps" is 5-20x faster there than "matrix".

Its backward pass is written out rather than left to autograd: the gradient g_t = dL/dc_t obeys the
same recurrence run backwards in time, g_t = dL/dc_t|direct + f_{t+1} g_{t+1}, so it reuses the block
scan, and then dL/df_t = g_t c_{t-1}, dL/du_t = g_t, dL/dc0 = f_1 g_1. Autograd through log f would
divide by f (small forget gates would amplify rounding), differentiate cumprod, and keep every
block's L x L matrix alive.

Shapes everywhere: f, u [batch, time, N]; c0 [batch, N]; result c [batch, time, N].
"""

import contextlib

import torch
import torch.nn.functional as F


def scan_reference(f: torch.Tensor, u: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    """The recurrence one time step at a time: obviously correct; on a GPU, launch-bound (T tiny steps)."""
    c, cs = c0, []
    for f_t, u_t in zip(f.unbind(1), u.unbind(1)):  # unbind: f[:, t] would cost O(T^2) in backward
        c = f_t * c + u_t
        cs.append(c)
    return torch.stack(cs, dim=1)


@contextlib.contextmanager
def _ieee_fp32_matmul():
    """Full-precision fp32 matmuls inside: TF32 or bf16 inputs would round log f to ~3 digits."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _segment_sum_operands(block_length: int, dtype: torch.dtype, device: torch.device):
    """(selector, mask) with `selector @ log_f + mask` = the segment sums of log f, [L*L, N] per block.

    selector[(t, s), r] = 1 when s < r <= t, so row (t, s) of the product sums log f over the steps
    s+1..t; mask[(t, s)] is 0 on and below the diagonal and -inf above it (no causal path from s to t).
    """
    step = torch.arange(block_length, device=device)
    t, s, r = step[:, None, None], step[None, :, None], step[None, None, :]
    selector = ((s < r) & (r <= t)).to(dtype).reshape(block_length * block_length, block_length)
    mask = torch.zeros(block_length, block_length, 1, dtype=dtype, device=device)
    mask = mask.masked_fill(t < s, float("-inf")).reshape(block_length * block_length, 1)
    return selector, mask


def _blocks_by_matrix(f: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All steps of every block at once; f, u [..., L, N] -> (result from c = 0, f_1 ... f_t), [..., L, N].

    decay[t, s] = f_{s+1} ... f_t = exp(log f_{s+1} + ... + log f_t) for s <= t, else 0. Each segment
    sum is added up directly by a GEMM with a 0/1 selector (rather than taken as a difference of
    cumulative sums, which cancels digits when a block holds tiny forget gates), and the -inf mask
    above the diagonal is applied before exp, so no exponent is ever > 0. Forget gates that underflow
    to 0 are clamped to the dtype's smallest normal number, so log f is finite.
    """
    block_length, width = f.shape[-2:]
    log_f = torch.log(f.clamp_min(torch.finfo(f.dtype).tiny)).reshape(-1, block_length, width)
    selector, mask = _segment_sum_operands(block_length, f.dtype, f.device)
    with _ieee_fp32_matmul():
        log_decay = torch.matmul(selector, log_f).add_(mask)
    decay = log_decay.exp_().view(-1, block_length, block_length, width)  # [block, t, s, N]
    local = decay.mul_(u.reshape(-1, 1, block_length, width)).sum(dim=2)
    return local.view(f.shape), log_f.cumsum(dim=1).exp().view(f.shape)


def _steps(f: torch.Tensor, u: torch.Tensor, c: torch.Tensor, keep_all: bool) -> torch.Tensor:
    """The recurrence over dim -2 of [..., L, N], every block at once: all L states, or only the last."""
    steps = []
    for f_t, u_t in zip(f.unbind(-2), u.unbind(-2)):
        c = torch.addcmul(u_t, f_t, c)
        steps.append(c)
    return torch.stack(steps, dim=-2) if keep_all else c


def _block_scan(
    f: torch.Tensor, u: torch.Tensor, c0: torch.Tensor, block_length: int, within: str
) -> torch.Tensor:
    """Forward computation of the block-parallel scan (no autograd: see `_BlockParallelScan`).

    Any time length works: the tail block is padded with f=1, u=0, which leaves the real steps unchanged.
    """
    batch, length, width = f.shape
    n_blocks = -(-length // block_length)
    pad = n_blocks * block_length - length
    if pad:
        f = F.pad(f, (0, 0, 0, pad), value=1.0)
        u = F.pad(u, (0, 0, 0, pad), value=0.0)
    f = f.reshape(batch, n_blocks, block_length, width)
    u = u.reshape(batch, n_blocks, block_length, width)

    # Each block as one step over its length: c_out = (f_1 ... f_L) c_in + (its result from c_in = 0).
    if within == "matrix":
        local, decay = _blocks_by_matrix(f, u)
        block_f, block_u = decay[:, :, -1], local[:, :, -1]
    else:
        block_f, block_u = f.prod(dim=2), _steps(f, u, torch.zeros_like(u[:, :, 0]), keep_all=False)

    # The c entering each block obeys the same recurrence one level up, over blocks, so it is scanned by
    # this same function: T steps take about log_L(T) levels of blocks, not T / L sequential steps.
    entering = c0.unsqueeze(1)
    if n_blocks > 1:
        ends = _block_scan(block_f[:, :-1], block_u[:, :-1], c0, max(block_length, 2), within)
        entering = torch.cat([entering, ends], dim=1)

    if within == "matrix":
        out = local + decay * entering.unsqueeze(2)
    else:
        out = _steps(f, u, entering, keep_all=True)
    return out.view(batch, n_blocks * block_length, width)[:, :length]


class _BlockParallelScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f, u, c0, block_length, within):
        c = _block_scan(f, u, c0, block_length, within)
        ctx.save_for_backward(f, c0, c)
        ctx.block_length, ctx.within = block_length, within
        return c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_c):
        f, c0, c = ctx.saved_tensors
        # g_t = grad_c_t + f_{t+1} g_{t+1}: the forward scan on time-reversed inputs, started from g = 0.
        f_next = torch.cat([f[:, 1:], torch.ones_like(f[:, :1])], dim=1)
        g = _block_scan(f_next.flip(1), grad_c.flip(1), torch.zeros_like(c0), ctx.block_length, ctx.within)
        g = g.flip(1)
        grad_f = torch.empty_like(f)  # g_t * c_{t-1}, written in two parts to save a concatenated copy
        torch.mul(g[:, 1:], c[:, :-1], out=grad_f[:, 1:])
        grad_f[:, 0] = g[:, 0] * c0
        return grad_f, g, f[:, 0] * g[:, 0], None, None


def scan_block_parallel(
    f: torch.Tensor, u: torch.Tensor, c0: torch.Tensor, block_length: int, within: str | None = None
) -> torch.Tensor:
    """The recurrence block by block (see the module docstring).

    `within` says how a block's own steps are computed: "matrix" (all at once, the log-space products)
    or "steps" (one step at a time for all blocks together); both give the same result. Default: matrix
    on CUDA, steps elsewhere (see the module docstring).
    """
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")
    within = within or ("matrix" if f.device.type == "cuda" else "steps")
    if within not in ("matrix", "steps"):
        raise ValueError(f"within must be 'matrix' or 'steps', got {within!r}")
    return _BlockParallelScan.apply(f, u, c0, block_length, within)
