"""GPT: the decoder-only transformer baseline of the Languini paper.

Token embedding x sqrt(h_dim) plus learned absolute positions, pre-LN blocks of causal softmax attention
(`scaled_dot_product_attention`) and a GELU(tanh) MLP, a final LayerNorm and an untied output layer.
No dropout. Init N(0, 0.02); the MLP output projection N(0, 0.02/sqrt(2 n_layers)); biases 0.
The model knows nothing of DDP, precision or compile: the trainer wires those in.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def _normal_linear(in_dim, out_dim, std, bias=True):
    layer = nn.Linear(in_dim, out_dim, bias=bias)
    nn.init.normal_(layer.weight, mean=0.0, std=std)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention; the heads' width n_heads*head_dim may differ from h_dim."""

    def __init__(self, h_dim, head_dim, n_heads):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        inner = n_heads * head_dim
        self.qkv = _normal_linear(h_dim, 3 * inner, 0.02)
        self.out = _normal_linear(inner, h_dim, 0.02)

    def forward(self, x):
        bsz, seqlen, _ = x.shape
        q, k, v = self.qkv(x).view(bsz, seqlen, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(bsz, seqlen, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, h_dim, mlp_dim, n_layers):
        super().__init__()
        self.fc = _normal_linear(h_dim, mlp_dim, 0.02)
        self.proj = _normal_linear(mlp_dim, h_dim, 0.02 / math.sqrt(2 * n_layers))

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, c):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.h_dim)
        self.attn = CausalSelfAttention(c.h_dim, c.head_dim, c.n_heads)
        self.ln2 = nn.LayerNorm(c.h_dim)
        self.mlp = MLP(c.h_dim, c.mlp_dim, c.n_layers)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Model(nn.Module):
    """`forward(x, state) -> (logits, state)`; GPT is stateless, so state is always None."""

    def __init__(self, config):
        super().__init__()
        self.c = c = config
        self.input_embedding = nn.Embedding(c.vocab_size, c.h_dim)
        self.position_embedding = nn.Embedding(c.seq_len, c.h_dim)
        nn.init.normal_(self.input_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.h_dim)
        self.linear = _normal_linear(c.h_dim, c.vocab_size, 0.02, bias=False)

    def get_init_state(self, batch_size, device):
        return None

    def forward(self, x, state=None):
        """x: [batch, seq] int64 token ids (seq <= seq_len) -> logits [batch, seq, vocab]."""
        seqlen = x.shape[1]
        pos = torch.arange(seqlen, device=x.device)
        h = self.input_embedding(x) * math.sqrt(self.c.h_dim) + self.position_embedding(pos)
        for layer in self.layers:
            h = layer(h)
        return self.linear(self.ln_f(h)), state
