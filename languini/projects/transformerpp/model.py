"""Transformer++: the decoder-only transformer of modern language models (LLaMA-style) at GPT's sizes.

Token embedding x sqrt(h_dim) as in GPT, no learned positions: queries and keys are rotated by rotary
position embeddings (RoPE, half-split pairing: dimension i pairs with i + head_dim/2), so attention scores
depend on relative positions only. Pre-norm blocks with RMSNorm, causal softmax attention
(`scaled_dot_product_attention(is_causal=True)`) and a SwiGLU MLP, a final RMSNorm and an untied output
layer. No biases anywhere, no dropout. Init N(0, 0.02); the two projections that write into the residual
stream (attention output, MLP output) N(0, 0.02/sqrt(2 n_layers)); RMSNorm weights 1.
The model knows nothing of DDP, precision or compile: the trainer wires those in.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def _normal_linear(in_dim, out_dim, std):
    layer = nn.Linear(in_dim, out_dim, bias=False)
    nn.init.normal_(layer.weight, mean=0.0, std=std)
    return layer


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors (from autocast) to fp32; fp32 and fp64 unchanged."""
    return t.float() if t.element_size() < 4 else t


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


def rope_tables(seq_len, head_dim, base, device, dtype):
    """cos and sin of the rotation angles, each [seq_len, head_dim/2]: angle(t, i) = t * base^(-2i/head_dim)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim)
    angles = torch.arange(seq_len, device=device, dtype=dtype)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i + d/2}) of x [..., T, d] by the angle of its position and frequency i."""
    x32 = x.to(cos.dtype)
    x1, x2 = x32.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with rotary queries and keys; no biases."""

    def __init__(self, h_dim, head_dim, n_heads, n_layers):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        self.n_heads, self.head_dim = n_heads, head_dim
        inner = n_heads * head_dim
        self.qkv = _normal_linear(h_dim, 3 * inner, 0.02)
        self.out = _normal_linear(inner, h_dim, 0.02 / math.sqrt(2 * n_layers))

    def forward(self, x, cos, sin):
        bsz, seqlen, _ = x.shape
        q, k, v = self.qkv(x).view(bsz, seqlen, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(bsz, seqlen, self.n_heads * self.head_dim))


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
    """Pre-norm block: x + attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, c):
        super().__init__()
        self.norm1 = RMSNorm(c.h_dim)
        self.attn = CausalSelfAttention(c.h_dim, c.head_dim, c.n_heads, c.n_layers)
        self.norm2 = RMSNorm(c.h_dim)
        self.mlp = SwiGLU(c.h_dim, c.mlp_dim, c.n_layers)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class Model(nn.Module):
    """`forward(x, state) -> (logits, state)`; the model is stateless, so state is always None."""

    def __init__(self, config):
        super().__init__()
        self.c = c = config
        self.input_embedding = nn.Embedding(c.vocab_size, c.h_dim)
        nn.init.normal_(self.input_embedding.weight, std=0.02)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm_f = RMSNorm(c.h_dim)
        self.linear = _normal_linear(c.h_dim, c.vocab_size, 0.02)

    def get_init_state(self, batch_size, device):
        return None

    def forward(self, x, state=None):
        """x: [batch, seq] int64 token ids -> logits [batch, seq, vocab]; positions count from 0 in x."""
        h = self.input_embedding(x) * math.sqrt(self.c.h_dim)
        dtype = torch.promote_types(self.linear.weight.dtype, torch.float32)
        cos, sin = rope_tables(x.shape[1], self.c.head_dim, self.c.rope_base, x.device, dtype)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.linear(self.norm_f(h)), state
