"""The quasi-LSTM recurrence c_t = f_t * c_{t-1} + u_t as two Triton kernels (forward and backward).

Layout of the work: one program owns one batch row and a block of BLOCK_N channels and walks over time
in chunks of CHUNK_T steps. Each chunk is loaded as one [CHUNK_T, BLOCK_N] tile (wide coalesced loads,
channels contiguous in memory), scanned along time in registers with `tl.associative_scan` (the pair
(f, u) composes as (f_a, u_a) then (f_b, u_b) = (f_a f_b, f_b u_a + u_b)), joined to the c carried in
from the previous chunk, stored, and the chunk's last row becomes the next carry. The carry never
leaves registers, so c is read from and written to memory exactly once: the kernel is bound by memory
bandwidth, the right regime for an elementwise recurrence. Parallelism comes from batch x channels:
quasi-LSTM small (12 heads x 64 = 768 channels) at micro-batch 16 gives 384 programs of 32 channels,
about three per H100 SM. A two-level scan (per-chunk totals, a scan over them, a fix-up pass) would also
parallelise time, but reads f and u twice; it pays only when batch x channels cannot fill the GPU.

Backward: the gradient obeys the same recurrence backwards in time, dc_t = g_t + f_{t+1} dc_{t+1}, so
the backward kernel runs the same chunked scan over time-reversed tiles and then writes
grad_u = dc, grad_f_t = dc_t c_{t-1} (c_0 := c0), grad_c0 = f_1 dc_1 (1-based time).
Everything is accumulated in fp32 whatever the input dtypes; the result has the promoted dtype of
(f, u, c0), each gradient the dtype of its input. Padding rows of a partial chunk load as the identity
(f = 1, u = 0), so any T works; masked channels make any N work.

The launches are torch custom operators (one opaque op each for torch.compile, fake versions for meta
tensors) with the backward registered as the forward's autograd formula. Triton is optional
(`pip install -e '.[triton]'`). On CPU tensors the kernels run only under Triton's interpreter
(`TRITON_INTERPRET=1` set before triton is imported), which is how the tests check them.
"""

import os

import torch

from languini.common_lib.errors import UserError

try:
    import triton
    import triton.language as tl
except ImportError:  # optional dependency: scan_triton explains how to install it
    triton = None

# Fixed launch sizes under the interpreter, where timing configs would only time the interpreter.
INTERPRETER_META = {"CHUNK_T": 16, "BLOCK_N": 32, "NUM_STAGES": 1}

if triton is not None:

    @triton.jit
    def _combine(f_a, u_a, f_b, u_b):
        """Step (f_a, u_a) followed by step (f_b, u_b), as one step: c -> f_b (f_a c + u_a) + u_b."""
        return f_a * f_b, f_b * u_a + u_b

    @triton.jit
    def _scan_tile(f, u, carry, CHUNK_T: tl.constexpr):
        """Scan a [CHUNK_T, BLOCK_N] tile along time from `carry`; returns (c tile, its last row)."""
        f_cum, u_cum = tl.associative_scan((f, u), 0, _combine)
        c = f_cum * carry[None, :] + u_cum
        is_last = (tl.arange(0, CHUNK_T) == CHUNK_T - 1)[:, None]
        return c, tl.sum(tl.where(is_last, c, 0.0), axis=0)

    @triton.jit
    def _scan_fwd_kernel(
        f_ptr, u_ptr, c0_ptr, c_ptr, T, N,
        f_sb, f_st, u_sb, u_st, c0_sb, c_sb, c_st,
        CHUNK_T: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(1).to(tl.int64)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        f_ptr += b * f_sb
        u_ptr += b * u_sb
        c_ptr += b * c_sb
        carry = tl.load(c0_ptr + b * c0_sb + cols, mask=col_ok, other=0.0).to(tl.float32)
        for start in tl.range(0, T, CHUNK_T, num_stages=NUM_STAGES):
            t = start + tl.arange(0, CHUNK_T)
            ok = (t < T)[:, None] & col_ok[None, :]
            f = tl.load(f_ptr + t[:, None] * f_st + cols[None, :], mask=ok, other=1.0).to(tl.float32)
            u = tl.load(u_ptr + t[:, None] * u_st + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            c, carry = _scan_tile(f, u, carry, CHUNK_T)
            tl.store(c_ptr + t[:, None] * c_st + cols[None, :], c.to(c_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _scan_bwd_kernel(
        f_ptr, c0_ptr, c_ptr, g_ptr, df_ptr, du_ptr, dc0_ptr, T, N,
        f_sb, f_st, c0_sb, c_sb, c_st, g_sb, g_st, df_sb, df_st, du_sb, du_st, dc0_sb,
        CHUNK_T: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(1).to(tl.int64)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        f_ptr += b * f_sb
        c_ptr += b * c_sb
        g_ptr += b * g_sb
        df_ptr += b * df_sb
        du_ptr += b * du_sb
        c0 = tl.load(c0_ptr + b * c0_sb + cols, mask=col_ok, other=0.0).to(tl.float32)
        carry = tl.zeros([BLOCK_N], dtype=tl.float32)  # dc_{t+1} beyond the last step is 0
        for start in tl.range(0, T, CHUNK_T, num_stages=NUM_STAGES):
            t = T - 1 - start - tl.arange(0, CHUNK_T)  # tile rows run backwards in time
            ok = (t >= 0)[:, None] & col_ok[None, :]
            has_next = ok & (t + 1 < T)[:, None]
            has_prev = ok & (t >= 1)[:, None]
            f_next = tl.load(f_ptr + (t + 1)[:, None] * f_st + cols[None, :], mask=has_next, other=0.0)
            f_next = tl.where(ok, f_next.to(tl.float32), 1.0)  # padding rows pass dc through unchanged
            g = tl.load(g_ptr + t[:, None] * g_st + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            dc, carry = _scan_tile(f_next, g, carry, CHUNK_T)
            c_prev = tl.load(c_ptr + (t - 1)[:, None] * c_st + cols[None, :], mask=has_prev, other=0.0)
            c_prev = tl.where((t == 0)[:, None], c0[None, :], c_prev.to(tl.float32))
            tl.store(du_ptr + t[:, None] * du_st + cols[None, :], dc.to(du_ptr.dtype.element_ty), mask=ok)
            df = dc * c_prev
            tl.store(df_ptr + t[:, None] * df_st + cols[None, :], df.to(df_ptr.dtype.element_ty), mask=ok)
        f_first = tl.load(f_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dc0 = f_first * carry  # carry is now dc at the first step
        tl.store(dc0_ptr + b * dc0_sb + cols, dc0.to(dc0_ptr.dtype.element_ty), mask=col_ok)

    # Autotune candidates (CHUNK_T, BLOCK_N, warps, stages). NUM_STAGES > 1 lets Triton prefetch the next
    # chunks' tiles with cp.async while the current one is scanned; small BLOCK_N gives more programs
    # when batch x channels is small. Timed once per (T, N, dtypes) on the first call; the choice is
    # cached on disk (Triton's cache dir), so a rerun or resume on the same machine uses the same config
    # and rounds identically (configs differ in the order the in-chunk scan adds, i.e. in the last ulp).
    _TUNING = [
        triton.Config({"CHUNK_T": chunk, "BLOCK_N": block, "NUM_STAGES": stages}, num_warps=warps)
        for chunk, block, warps, stages in [
            (16, 32, 2, 1),
            (16, 32, 2, 3),
            (32, 32, 2, 3),
            (16, 64, 2, 3),
            (32, 64, 4, 1),
            (32, 64, 4, 3),
            (16, 128, 4, 3),
            (64, 32, 4, 2),
        ]
    ]
    _scan_fwd_tuned = triton.autotune(_TUNING, key=["T", "N"], cache_results=True)(_scan_fwd_kernel)
    _scan_bwd_tuned = triton.autotune(_TUNING, key=["T", "N"], cache_results=True)(_scan_bwd_kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """The kernels index batch and time by stride but need channels contiguous; copy only if they are not."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _outer_strides(tensors) -> list[int]:
    """Batch and time strides of each tensor in order (batch only for [B, N]), as the kernels take them."""
    return [stride for x in tensors for stride in x.stride()[:-1]]


def _launch(kernel_tuned, kernel_fixed, tensors) -> None:
    """Run a kernel on `tensors` (the first is [B, T, N]): autotuned on a GPU, `INTERPRETER_META` otherwise."""
    batch, length, width = tensors[0].shape
    if tensors[0].numel() == 0:
        return
    args = (*tensors, length, width, *_outer_strides(tensors))
    if tensors[0].device.type == "cuda" and not _interpreting():
        grid = lambda meta: (triton.cdiv(width, meta["BLOCK_N"]), batch)  # noqa: E731
        with torch.cuda.device(tensors[0].device):  # Triton launches on the current device: the tensors'
            kernel_tuned[grid](*args)
    else:
        grid = (triton.cdiv(width, INTERPRETER_META["BLOCK_N"]), batch)
        kernel_fixed[grid](*args, **INTERPRETER_META)


def _result_dtype(f: torch.Tensor, u: torch.Tensor, c0: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(f.dtype, u.dtype), c0.dtype)


# The two launches are registered as custom operators: torch.compile treats each as one opaque op (no
# graph break, no tracing into Triton's launcher), and the fake versions give shapes on meta tensors.
@torch.library.custom_op("languini::linear_scan_forward", mutates_args=())
def _scan_forward(f: torch.Tensor, u: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    f, u, c0 = _row_major(f), _row_major(u), _row_major(c0)
    c = torch.empty(f.shape, dtype=_result_dtype(f, u, c0), device=f.device)
    _launch(_scan_fwd_tuned, _scan_fwd_kernel, (f, u, c0, c))
    return c


@_scan_forward.register_fake
def _(f, u, c0):
    return f.new_empty(f.shape, dtype=_result_dtype(f, u, c0))


@torch.library.custom_op("languini::linear_scan_backward", mutates_args=())
def _scan_backward(
    f: torch.Tensor, c0: torch.Tensor, c: torch.Tensor, grad_c: torch.Tensor, u_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    f, c0, grad_c = _row_major(f), _row_major(c0), _row_major(grad_c)
    grad_f = torch.empty(f.shape, dtype=f.dtype, device=f.device)
    grad_u = torch.empty(f.shape, dtype=u_dtype, device=f.device)
    grad_c0 = torch.zeros(c0.shape, dtype=c0.dtype, device=c0.device)  # stays 0 when T = 0
    _launch(_scan_bwd_tuned, _scan_bwd_kernel, (f, c0, c, grad_c, grad_f, grad_u, grad_c0))
    return grad_f, grad_u, grad_c0


@_scan_backward.register_fake
def _(f, c0, c, grad_c, u_dtype):
    return f.new_empty(f.shape), f.new_empty(f.shape, dtype=u_dtype), c0.new_empty(c0.shape)


def _setup_context(ctx, inputs, output):
    f, u, c0 = inputs
    ctx.save_for_backward(f, c0, output)  # u is not needed: grad_f = dc * c_prev, grad_u = dc
    ctx.u_dtype = u.dtype


def _backward(ctx, grad_c):
    f, c0, c = ctx.saved_tensors
    return _scan_backward(f, c0, c, grad_c, ctx.u_dtype)


_scan_forward.register_autograd(_backward, setup_context=_setup_context)


def scan_triton(f: torch.Tensor, u: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    """c_t = f_t * c_{t-1} + u_t for f, u [batch, time, N] and c0 [batch, N]; returns c [batch, time, N].

    Differentiable in f, u and c0. Needs Triton and a CUDA device (or Triton's interpreter on CPU).
    Meta tensors give meta results, so shape-only passes (FLOP counting on the meta device) work.
    """
    if triton is None:
        raise UserError("--scan triton needs Triton: pip install -e '.[triton]' (or use --scan torch)")
    if f.device.type not in ("cuda", "meta") and not _interpreting():
        raise UserError(f"--scan triton runs on CUDA only, got a {f.device.type} tensor (use --scan torch)")
    if f.dim() != 3 or u.shape != f.shape or c0.shape != (f.shape[0], f.shape[2]):
        raise ValueError(f"expected f, u [B, T, N] and c0 [B, N]; got {tuple(f.shape)}, {tuple(u.shape)}, "
                         f"{tuple(c0.shape)}")  # fmt: skip
    return _scan_forward(f, u, c0)
