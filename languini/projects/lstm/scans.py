"""The quasi-LSTM recurrence c_t = f_t * c_{t-1} + u_t (elementwise), computed two ways.

`scan_reference` is the plain step-by-step loop: the definition, kept to test the fast path against.
`scan_block_parallel` splits time into blocks of `block_length` steps. Each block acts on the c that
enters it as one step, c_out = (f_1 ... f_L) c_in + (its result from c_in = 0), so the c entering every
block follows the same recurrence one level up, over blocks, and is scanned by the same function:
T steps take about log_L(T) levels instead of T sequential steps (the "steps" form below walks a level
of at most 2L blocks step by step instead, which costs less than padding and two more passes).
A block's own steps are computed one of two ways, with the same result:
- "matrix" (the default on CUDA): all steps at once. Every product of forget gates f_{s+1} ... f_t is
  taken in log space, a sum of log f over the causal lower triangle (one GEMM with a 0/1 selector),
  then exponentiated; every exponent is <= 0 (log f <= 0, non-causal pairs are masked to -inf before
  exp), so nothing overflows and nothing is divided by a small number. A block is a few batched ops.
- "steps" (the default elsewhere): the L steps of a block in sequence, for all blocks at once. On a CPU
  a small op costs microseconds, not a kernel launch, and the matrix form's L x L exps per block cost
  more than they save: measured (benchmarks/lstm_speed.py), "steps" is 25-35x faster there than
  "matrix". It runs backwards in time for the backward pass by walking the blocks in reverse, with
  no flipped copies, and writes each step into its slot of the output (no stacking).

Its backward pass is written out rather than left to autograd: the gradient g_t = dL/dc_t obeys the
same recurrence run backwards in time, g_t = dL/dc_t|direct + f_{t+1} g_{t+1}, so it reuses the block
scan, and then dL/df_t = g_t c_{t-1}, dL/du_t = g_t, dL/dc0 = f_1 g_1. Autograd through log f would
divide by f (small forget gates would amplify rounding), differentiate cumprod, and keep every
block's L x L matrix alive.

Under torch.compile both forms, forward and backward, trace into the caller's graph with no graph
break: the matrix form's one matmul is the custom operator `languini::segment_sums` (full fp32
precision, opaque to the compiler), and the steps form's out= writes become copies (`_into`).

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


# The one matmul of the "matrix" form is a custom operator, so torch.compile keeps it whole: reading and
# setting the global matmul precision cannot be traced (each call was a graph break), and a traced
# matmul would run at whatever precision (TF32) the compiled graph is launched with. Everything around
# it (log, mask, exp, products, sums) is traced and fused by the compiler as usual.
@torch.library.custom_op("languini::segment_sums", mutates_args=())
def _segment_sums(selector: torch.Tensor, log_f: torch.Tensor) -> torch.Tensor:
    """selector [L*L, L] @ log_f [blocks, L, N] -> [blocks, L*L, N], at full fp32 precision."""
    with _ieee_fp32_matmul():
        return torch.matmul(selector, log_f)


@_segment_sums.register_fake
def _(selector, log_f):
    return log_f.new_empty(log_f.shape[0], selector.shape[0], log_f.shape[2])


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
    log_decay = _segment_sums(selector, log_f).add_(mask)
    decay = log_decay.exp_().view(-1, block_length, block_length, width)  # [block, t, s, N]
    local = decay.mul_(u.reshape(-1, 1, block_length, width)).sum(dim=2)
    return local.view(f.shape), log_f.cumsum(dim=1).exp().view(f.shape)


def _into(out: torch.Tensor, op, *args) -> torch.Tensor:
    """op(*args) written into the view `out`, returned: with out= in eager (no temporary), through a copy
    under torch.compile, which cannot trace out= into a strided view (and fuses the copy away)."""
    if torch.compiler.is_compiling():
        return out.copy_(op(*args))
    return op(*args, out=out)


def _pad_to_blocks(f: torch.Tensor, u: torch.Tensor, block_length: int):
    """f, u [batch, T, N] -> [batch, blocks, L, N], the tail padded with f=1, u=0 (no effect on c)."""
    batch, length, width = f.shape
    n_blocks = -(-length // block_length)
    pad = n_blocks * block_length - length
    if pad:
        f = F.pad(f, (0, 0, 0, pad), value=1.0)
        u = F.pad(u, (0, 0, 0, pad), value=0.0)
    shape = (batch, n_blocks, block_length, width)
    return f.reshape(shape), u.reshape(shape)


def _scan_by_matrix(f: torch.Tensor, u: torch.Tensor, c0: torch.Tensor, block_length: int) -> torch.Tensor:
    """The block-parallel scan without autograd, a block's steps all at once (see the module docstring)."""
    batch, length, width = f.shape
    f, u = _pad_to_blocks(f, u, block_length)
    local, decay = _blocks_by_matrix(f, u)
    # The c entering each block obeys the same recurrence one level up, over blocks, so it is scanned by
    # this same function: T steps take about log_L(T) levels of blocks, not T / L sequential steps.
    entering = c0.unsqueeze(1)
    if f.shape[1] > 1:
        ends = _scan_by_matrix(decay[:, :-1, -1], local[:, :-1, -1], c0, max(block_length, 2))
        entering = torch.cat([entering, ends], dim=1)
    out = local + decay * entering.unsqueeze(2)
    return out.view(batch, -1, width)[:, :length]


def _scan_by_steps(
    f: torch.Tensor, u: torch.Tensor, c0: torch.Tensor, block_length: int, reverse: bool = False
) -> torch.Tensor:
    """The block-parallel scan without autograd (see `_BlockParallelScan`), a block's steps one at a
    time for all blocks together.

    reverse=True runs time backwards, c_t = f_t c_{t+1} + u_t from c0 after the last step, without
    flipping any tensor (a flip is a full copy, and on a CPU a slow one). Every step writes straight into
    its slot of the output, so nothing is stacked or concatenated.
    """
    batch, length, width = f.shape
    block_length = min(block_length, length)  # a sequence shorter than a block is one unpadded block
    f, u = _pad_to_blocks(f, u, block_length)
    n_blocks = f.shape[1]
    order = range(block_length - 1, -1, -1) if reverse else range(block_length)

    entering = torch.empty_like(f[:, :, 0])  # the c entering each block
    entering[:, -1 if reverse else 0] = c0
    if n_blocks > 1:
        # Each block as one step over its length: c_out = (f_1 ... f_L) c_in + (its result from c_in = 0)
        # (the block that would enter no other is skipped) ...
        feeding, fed = (slice(1, None), slice(None, -1)) if reverse else (slice(None, -1), slice(1, None))
        f_steps, u_steps = f[:, feeding].unbind(2), u[:, feeding].unbind(2)
        first, *rest = order
        block_u = u_steps[first]
        for t in rest:
            block_u = torch.addcmul(u_steps[t], f_steps[t], block_u)
        # ... so the c entering each block follows the same recurrence over blocks: stepped through when
        # the blocks are few (T=512, L=16: 31 steps cost less than another level's padding and two
        # passes), else scanned in blocks again (about log_L(T) levels).
        block_f = f[:, feeding].prod(dim=2)
        few = n_blocks - 1 <= 2 * block_length
        next_length = n_blocks - 1 if few else max(block_length, 2)
        entering[:, fed] = _scan_by_steps(block_f, block_u, c0, next_length, reverse)

    out = torch.empty_like(f)
    f_steps, u_steps, out_steps = f.unbind(2), u.unbind(2), out.unbind(2)
    c = entering
    for t in order:
        c = _into(out_steps[t], torch.addcmul, u_steps[t], f_steps[t], c)
    return out.view(batch, -1, width)[:, :length]


class _BlockParallelScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f, u, c0, block_length, within):
        if within == "matrix":
            c = _scan_by_matrix(f, u, c0, block_length)
        else:
            c = _scan_by_steps(f, u, c0, block_length)
        ctx.save_for_backward(f, c0, c)
        ctx.block_length, ctx.within = block_length, within
        return c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_c):
        f, c0, c = ctx.saved_tensors
        # g_t = grad_c_t + f_{t+1} g_{t+1}: the same scan run backwards in time, from g = 0 after the end.
        f_next = torch.empty_like(f)
        f_next[:, :-1] = f[:, 1:]
        f_next[:, -1] = 1.0
        zeros = torch.zeros_like(c0)
        if ctx.within == "matrix":  # flips are cheap on a GPU
            g = _scan_by_matrix(f_next.flip(1), grad_c.flip(1), zeros, ctx.block_length).flip(1)
        else:
            g = _scan_by_steps(f_next, grad_c, zeros, ctx.block_length, reverse=True)
        grad_f = torch.empty_like(f)  # g_t * c_{t-1}, written in two parts to save a concatenated copy
        _into(grad_f[:, 1:], torch.mul, g[:, 1:], c[:, :-1])
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
