"""The recurrent baselines of the Languini paper: a multi-head quasi-LSTM and a multi-head classic LSTM.

Token embedding x sqrt(h_dim) (no position embedding: the recurrence knows the order), pre-LN blocks
`x + RNN(LN(x))` then `x + MLP(LN(x))` with a GELU(tanh) MLP, a final LayerNorm and an untied output
layer without bias. Init as GPT: N(0, 0.02), the MLP output projection N(0, 0.02/sqrt(2 n_layers)),
biases 0. The state is one (c, h) pair per layer, each [batch, n_heads*head_dim]; `forward` returns the
final pair so the trainer can carry (and detach) it into the next step.

Cells (N = n_heads * head_dim, every gate elementwise per channel, heads only group the channels):
- quasi-LSTM (default): gates from the input only, one Linear(h_dim, 4N) giving fx, ix, zx, ox;
  f = sigmoid(fx + 1), u = sigmoid(ix) * tanh(zx), c_t = f_t c_{t-1} + u_t, h_t = sigmoid(ox) tanh(c_t).
  With no h in the gates the recurrence is linear in c, so it is computed block-parallel (scans.py).
- coupled quasi-LSTM (`coupled`): 3 projections fx, zx, ox, input gate tied to the forget gate,
  u = (1 - f) tanh(zx). The reference RTX 3090 throughputs of the paper were measured on this variant.
- classic LSTM (`non_quasi`): the same gates plus recurrent terms from h_{t-1}; each head has its own
  [head_dim, 4 head_dim] recurrent weight (h of a head feeds only that head's gates). The input
  projections of all steps are one matmul; each step is one batched matmul over the heads. The time
  loop stays out of torch.compile (`_classic_recurrence`); the layers around it compile.
All cells end with a post-head Linear(N, h_dim). The recurrence runs in fp32 even under autocast.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from languini.common_lib.errors import UserError

from .scans import scan_block_parallel, scan_reference


def _normal_linear(in_dim, out_dim, std, bias=True):
    layer = nn.Linear(in_dim, out_dim, bias=bias)
    nn.init.normal_(layer.weight, mean=0.0, std=std)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def _fp32(device: torch.device):
    """Turns autocast off so gates, cell state and the scan keep (at least) fp32 precision."""
    if device.type == "meta":  # FLOP counting on the meta device: no autocast to turn off
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors (from autocast) to fp32; fp32 and fp64 unchanged."""
    return t.float() if t.element_size() < 4 else t


class QuasiLSTM(nn.Module):
    """Multi-head quasi-LSTM; `scan` picks the recurrence kernel: 'torch', 'reference' or 'triton'."""

    def __init__(self, h_dim, head_dim, n_heads, block_length, coupled=False, scan="torch"):
        super().__init__()
        self.width = n_heads * head_dim
        self.block_length, self.coupled, self.scan = block_length, coupled, scan
        self.gates = _normal_linear(h_dim, (3 if coupled else 4) * self.width, 0.02)
        self.post_head = _normal_linear(self.width, h_dim, 0.02)

    def _scan(self, f, u, c0):
        if self.scan == "torch":
            return scan_block_parallel(f, u, c0, self.block_length)
        if self.scan == "reference":
            return scan_reference(f, u, c0)
        if self.scan == "triton":
            from .triton_scan import scan_triton

            return scan_triton(f, u, c0)
        raise UserError(f"unknown scan kernel '{self.scan}'; valid: torch, reference, triton")

    def forward(self, x, state):
        c0, _ = state
        gates = self.gates(x)
        with _fp32(x.device):
            if self.coupled:
                fx, zx, ox = _at_least_fp32(gates).chunk(3, dim=-1)
                f = torch.sigmoid(fx + 1.0)
                u = (1.0 - f) * torch.tanh(zx)
            else:
                fx, ix, zx, ox = _at_least_fp32(gates).chunk(4, dim=-1)
                f = torch.sigmoid(fx + 1.0)
                u = torch.sigmoid(ix) * torch.tanh(zx)
            c = self._scan(f, u, c0)
            h = torch.sigmoid(ox) * torch.tanh(c)
        # clones: views would keep the whole [batch, T, N] tensors alive (and in checkpoints) with the state
        return self.post_head(h), (c[:, -1].clone(), h[:, -1].clone())


@torch.compiler.disable
def _classic_recurrence(gates_x, c, h, recurrent):
    """The classic LSTM's time loop: gates_x [time, heads, batch, 4*head_dim], c and h [heads, batch,
    head_dim], recurrent [heads, head_dim, 4*head_dim] -> (every h [heads, batch, time, head_dim], c, h).

    Kept out of torch.compile, which would unroll the loop into T copies of the step (about a minute
    of tracing per layer at T=512); the projections around it still compile. Runs in fp32 even when
    the caller's autocast reaches it.
    """
    dim = h.shape[-1]
    hs = []
    with _fp32(gates_x.device):
        # unbind, not gates_x[t]: indexing in a loop would make backward build T full-size gradients
        for gates_t in gates_x.unbind(0):
            pre = torch.baddbmm(gates_t, h, recurrent)
            f, i, _, o = torch.sigmoid(pre).chunk(4, dim=-1)
            c = torch.addcmul(i * torch.tanh(pre[..., 2 * dim : 3 * dim]), f, c)
            h = o * torch.tanh(c)
            hs.append(h)
    return torch.stack(hs, dim=2), c, h


class ClassicLSTM(nn.Module):
    """Multi-head LSTM with per-head recurrent weights; a loop over time, one batched matmul per step."""

    def __init__(self, h_dim, head_dim, n_heads):
        super().__init__()
        self.n_heads, self.head_dim, self.width = n_heads, head_dim, n_heads * head_dim
        self.gates = _normal_linear(h_dim, 4 * self.width, 0.02)
        # recurrent[k] maps head k's h [head_dim] to its four gate pre-activations [4, head_dim]
        self.recurrent = nn.Parameter(torch.randn(n_heads, head_dim, 4 * head_dim) * 0.02)
        self.register_buffer(
            "forget_offset", torch.tensor([1.0, 0.0, 0.0, 0.0]).view(4, 1, 1), persistent=False
        )
        self.post_head = _normal_linear(self.width, h_dim, 0.02)

    def forward(self, x, state):
        batch, length, _ = x.shape
        heads, dim = self.n_heads, self.head_dim
        gates_x = self.gates(x)
        with _fp32(x.device):
            # [time, heads, batch, 4*head_dim], laid out so each step adds one contiguous slice; the
            # forget gate's +1 is added here once for all steps
            gates_x = _at_least_fp32(gates_x).view(batch, length, 4, heads, dim) + self.forget_offset
            gates_x = gates_x.permute(1, 3, 0, 2, 4).reshape(length, heads, batch, 4 * dim)
            c, h = (s.view(batch, heads, dim).transpose(0, 1) for s in state)  # [heads, batch, head_dim]
            hs, c, h = _classic_recurrence(gates_x, c, h, _at_least_fp32(self.recurrent))
            out = hs.permute(1, 2, 0, 3).reshape(batch, length, self.width)
        new_state = tuple(s.transpose(0, 1).reshape(batch, self.width) for s in (c, h))
        return self.post_head(out), new_state


class MLP(nn.Module):
    def __init__(self, h_dim, mlp_dim, n_layers):
        super().__init__()
        self.fc = _normal_linear(h_dim, mlp_dim, 0.02)
        self.proj = _normal_linear(mlp_dim, h_dim, 0.02 / math.sqrt(2 * n_layers))

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LN recurrent block: x + RNN(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, c):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.h_dim)
        if c.non_quasi:
            self.rnn = ClassicLSTM(c.h_dim, c.head_dim, c.n_heads)
        else:
            self.rnn = QuasiLSTM(c.h_dim, c.head_dim, c.n_heads, c.block_length, c.coupled, c.scan)
        self.ln2 = nn.LayerNorm(c.h_dim)
        self.mlp = MLP(c.h_dim, c.mlp_dim, c.n_layers)

    def forward(self, x, state):
        y, state = self.rnn(self.ln1(x), state)
        x = x + y
        return x + self.mlp(self.ln2(x)), state


class Model(nn.Module):
    """`forward(x, state) -> (logits, state)`; state is a list of (c, h) per layer, see `get_init_state`."""

    def __init__(self, config):
        super().__init__()
        self.c = c = config
        if c.non_quasi and c.coupled:
            raise UserError("--coupled applies to the quasi-LSTM only; drop it or --non_quasi")
        self.input_embedding = nn.Embedding(c.vocab_size, c.h_dim)
        nn.init.normal_(self.input_embedding.weight, std=0.02)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.h_dim)
        self.linear = _normal_linear(c.h_dim, c.vocab_size, 0.02, bias=False)

    def get_init_state(self, batch_size, device):
        """Zero (c, h) per layer, each [batch_size, n_heads*head_dim]; fp32 (fp64 for an fp64 model)."""
        shape = (batch_size, self.c.n_heads * self.c.head_dim)
        dtype = torch.promote_types(self.linear.weight.dtype, torch.float32)
        return [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(self.c.n_layers)
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
        return self.linear(self.ln_f(h)), new_state
