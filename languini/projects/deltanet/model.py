"""Gated DeltaNet (Yang, Kautz & Hatamizadeh, "Gated Delta Networks", ICLR 2025) with SwiGLU MLPs.

Token embedding x sqrt(h_dim) as in GPT, no position embedding (the recurrence knows the order), pre-norm
blocks `x + GatedDeltaNet(RMSNorm(x))` then `x + SwiGLU(RMSNorm(x))`, a final RMSNorm and an untied output
layer. No biases in the linear layers, no dropout. Init N(0, 0.02); the projections that write into the
residual stream N(0, 0.02/sqrt(2 n_layers)).

The token mixer, per head (n_heads heads, keys and values of head_dim channels):
- q, k, v = Linear(x), each through a short causal depthwise convolution (kernel conv_size) and SiLU;
- q and k L2-normalised per head, q then scaled by 1/sqrt(head_dim);
- beta = sigmoid(Linear(x)) in (0, 1), one per head and step;
- log-decay g = -exp(A_log) * softplus(Linear(x) + dt_bias) <= 0 (Mamba-2 style; `gate=False`: g = 0,
  the plain delta rule, and the decay parameters are not created);
- S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T, o_t = S_t^T q_t (scans.py);
- o = RMSNorm_head(o) * SiLU(Linear(x)) (the output gate), then the output projection.

The model is stateful: per layer the state is (S [batch, n_heads, head_dim, head_dim], and the last
conv_size - 1 inputs of the q, k and v convolutions, each [batch, channels, conv_size - 1]), carried across
batches like the quasi-LSTM's. The convolutions, normalisations, gates and the delta rule run in fp32 even
under autocast; the projections around them use the autocast precision.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from languini.common_lib.errors import UserError

from .scans import delta_rule_chunked, delta_rule_reference

FLA_MISSING = (
    "--kernel fla needs the flash-linear-attention package (pip install -e '.[fla]' or "
    "pip install flash-linear-attention); use --kernel torch without it"
)


def _normal_linear(in_dim, out_dim, std):
    layer = nn.Linear(in_dim, out_dim, bias=False)
    nn.init.normal_(layer.weight, mean=0.0, std=std)
    return layer


def _fp32(device: torch.device):
    """Turns autocast off so the recurrence and its inputs keep (at least) fp32 precision."""
    if device.type == "meta":  # FLOP counting on the meta device: no autocast to turn off
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors (from autocast) to fp32; fp32 and fp64 unchanged."""
    return t.float() if t.element_size() < 4 else t


def load_fla_kernel():
    """flash-linear-attention's chunked gated delta rule, or a one-line error when it is not installed."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        raise UserError(FLA_MISSING) from None
    return chunk_gated_delta_rule


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension, computed in (at least) fp32."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = _at_least_fp32(x)
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight).to(x.dtype)


def l2_normalise(x, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


class ShortConv(nn.Module):
    """Causal depthwise convolution over time with a cache of the last `size - 1` inputs, then SiLU.

    `forward(x [B, T, C], cache [B, C, size-1]) -> (y [B, T, C], new cache)`: the cache holds the inputs
    before x (zeros at the start of a stream), so calls on consecutive pieces equal one call on the whole.
    """

    def __init__(self, channels, size):
        super().__init__()
        self.size = size
        bound = 1 / math.sqrt(size)  # nn.Conv1d's default for a depthwise kernel (fan-in = size)
        self.weight = nn.Parameter(torch.empty(channels, 1, size).uniform_(-bound, bound))

    def forward(self, x, cache):
        window = torch.cat([cache, x.transpose(1, 2)], dim=2)  # [B, C, size - 1 + T]
        y = F.conv1d(window, self.weight.to(window.dtype), groups=window.shape[1])
        # the last size - 1 inputs; cloned so the carried state does not keep the whole window alive
        new_cache = window[:, :, window.shape[2] - (self.size - 1) :].clone()
        return F.silu(y).transpose(1, 2), new_cache


class DeltaRule(nn.Module):
    """The recurrence of scans.py (same shapes); `kernel`: 'torch' (chunked), 'reference' or 'fla'.

    A module of its own (without parameters) so FLOP counts show the recurrence on its own line.
    """

    def __init__(self, kernel="torch", chunk_size=64):
        super().__init__()
        self.kernel, self.chunk_size = kernel, chunk_size
        if kernel == "fla":
            load_fla_kernel()  # fail at build time, not at the first step

    def forward(self, q, k, v, beta, g, state):
        """q, k, v [B, H, T, D]; beta, g [B, H, T]; state [B, H, D, D] -> (out [B, H, T, D], state)."""
        kernel = self.kernel
        if kernel == "fla" and q.device.type == "meta":
            kernel = "torch"  # FLOP counting: the chunked form is the same computation
        if kernel == "torch":
            return delta_rule_chunked(q, k, v, beta, g, state, chunk_size=self.chunk_size)
        if kernel == "reference":
            return delta_rule_reference(q, k, v, beta, g, state)
        if kernel != "fla":
            raise UserError(f"unknown delta-rule kernel '{kernel}'; valid: torch, reference, fla")
        if q.device.type != "cuda":
            raise UserError(f"--kernel fla runs on CUDA only, not on {q.device.type}; use --kernel torch")
        half = torch.bfloat16  # the fla kernel takes half-precision q, k, v and time-first [B, T, H, ...]
        q, k, v, beta = (t.transpose(1, 2).to(half) for t in (q, k, v, beta))
        out, new_state = load_fla_kernel()(
            q=q, k=k, v=v, g=g.transpose(1, 2).float(), beta=beta, scale=1.0,
            initial_state=state.float(), output_final_state=True,
        )  # fmt: skip
        return out.transpose(1, 2).to(state.dtype), new_state.to(state.dtype)


class GatedDeltaNet(nn.Module):
    """The gated delta-rule token mixer; `kernel` picks the recurrence: 'torch', 'reference' or 'fla'."""

    def __init__(
        self, h_dim, head_dim, n_heads, n_layers, conv_size=4, gate=True, kernel="torch", chunk_size=64
    ):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.gate = gate
        inner = n_heads * head_dim
        self.q_proj = _normal_linear(h_dim, inner, 0.02)
        self.k_proj = _normal_linear(h_dim, inner, 0.02)
        self.v_proj = _normal_linear(h_dim, inner, 0.02)
        self.q_conv, self.k_conv, self.v_conv = (ShortConv(inner, conv_size) for _ in range(3))
        self.beta_proj = _normal_linear(h_dim, n_heads, 0.02)
        if gate:
            self.a_proj = _normal_linear(h_dim, n_heads, 0.02)
            # Mamba-2's init: decay rates A in [1, 16], time steps dt log-uniform in [1e-3, 1e-1]
            self.A_log = nn.Parameter(torch.empty(n_heads).uniform_(1, 16).log())
            dt = torch.exp(torch.empty(n_heads).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.delta_rule = DeltaRule(kernel, chunk_size)
        self.out_gate = _normal_linear(h_dim, inner, 0.02)
        self.out_norm = RMSNorm(head_dim)
        self.out_proj = _normal_linear(inner, h_dim, 0.02 / math.sqrt(2 * n_layers))

    def forward(self, x, state):
        batch, length, _ = x.shape
        heads, dim = self.n_heads, self.head_dim
        recurrent, q_cache, k_cache, v_cache = state
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        beta_x = self.beta_proj(x)
        a_x = self.a_proj(x) if self.gate else None
        gate = self.out_gate(x)
        with _fp32(x.device):
            q, q_cache = self.q_conv(_at_least_fp32(q), q_cache)
            k, k_cache = self.k_conv(_at_least_fp32(k), k_cache)
            v, v_cache = self.v_conv(_at_least_fp32(v), v_cache)
            # heads first, [B, H, T, ...], the layout of the scan
            q = l2_normalise(q.reshape(batch, length, heads, dim).transpose(1, 2)) * dim**-0.5
            k = l2_normalise(k.reshape(batch, length, heads, dim).transpose(1, 2))
            v = v.reshape(batch, length, heads, dim).transpose(1, 2)
            # beta and g made contiguous in that layout: compiled graphs then agree with eager on the
            # strides of their gradients
            beta = torch.sigmoid(_at_least_fp32(beta_x).transpose(1, 2).contiguous())
            if self.gate:
                a = _at_least_fp32(a_x).transpose(1, 2).contiguous()
                g = -torch.exp(self.A_log)[:, None] * F.softplus(a + self.dt_bias[:, None])
            else:
                g = torch.zeros_like(beta)
            o, recurrent = self.delta_rule(q, k, v, beta, g, recurrent)
            o = self.out_norm(o.transpose(1, 2)).reshape(batch, length, heads * dim)
        o = o.to(gate.dtype) * F.silu(gate)
        return self.out_proj(o), (recurrent, q_cache, k_cache, v_cache)


class SwiGLU(nn.Module):
    """proj(SiLU(x W_gate) * (x W_up)); W_gate and W_up are one [h_dim, 2 mlp_dim] matmul."""

    def __init__(self, h_dim, mlp_dim, n_layers):
        super().__init__()
        self.fc = _normal_linear(h_dim, 2 * mlp_dim, 0.02)
        self.proj = _normal_linear(mlp_dim, h_dim, 0.02 / math.sqrt(2 * n_layers))

    def forward(self, x):
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm block: x + GatedDeltaNet(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, c):
        super().__init__()
        self.norm1 = RMSNorm(c.h_dim)
        self.mixer = GatedDeltaNet(
            c.h_dim, c.head_dim, c.n_heads, c.n_layers, c.conv_size, c.gate, c.kernel, c.chunk_size
        )
        self.norm2 = RMSNorm(c.h_dim)
        self.mlp = SwiGLU(c.h_dim, c.mlp_dim, c.n_layers)

    def forward(self, x, state):
        y, state = self.mixer(self.norm1(x), state)
        x = x + y
        return x + self.mlp(self.norm2(x)), state


class Model(nn.Module):
    """`forward(x, state) -> (logits, state)`; state is a list of one tuple per layer, see `get_init_state`."""

    def __init__(self, config):
        super().__init__()
        self.c = c = config
        if c.conv_size < 1 or c.chunk_size < 1:
            raise UserError(
                f"--conv_size and --chunk_size must be positive, got {c.conv_size} and {c.chunk_size}"
            )
        self.input_embedding = nn.Embedding(c.vocab_size, c.h_dim)
        nn.init.normal_(self.input_embedding.weight, std=0.02)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm_f = RMSNorm(c.h_dim)
        self.linear = _normal_linear(c.h_dim, c.vocab_size, 0.02)

    def get_init_state(self, batch_size, device):
        """Zeros per layer: (S [batch, n_heads, head_dim, head_dim], q, k and v convolution caches, each
        [batch, n_heads*head_dim, conv_size-1]); fp32 (fp64 for an fp64 model)."""
        c = self.c
        dtype = torch.promote_types(self.linear.weight.dtype, torch.float32)
        inner = c.n_heads * c.head_dim

        def zeros(*shape):
            return torch.zeros(batch_size, *shape, dtype=dtype, device=device)

        return [
            (zeros(c.n_heads, c.head_dim, c.head_dim), *(zeros(inner, c.conv_size - 1) for _ in range(3)))
            for _ in range(c.n_layers)
        ]

    def forward(self, x, state=None):
        """x: [batch, seq] int64 token ids -> (logits [batch, seq, vocab], final state); state None = zeros."""
        if state is None:
            state = self.get_init_state(x.shape[0], x.device)
        h = self.input_embedding(x) * math.sqrt(self.c.h_dim)
        new_state = []
        for layer, layer_state in zip(self.layers, state):
            h, layer_state = layer(h, layer_state)
            new_state.append(layer_state)
        return self.linear(self.norm_f(h)), new_state
