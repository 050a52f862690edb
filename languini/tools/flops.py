"""FLOP counting with `torch.utils.flop_counter.FlopCounterMode` (no DeepSpeed), and the analytic GPT count.

Convention: one multiply-add is 2 FLOPs; only matrix products are counted (linear layers, attention's
QK^T and AV, convolutions), as FlopCounterMode does. Attention is counted over the full T x T score matrix
(the causal mask is not subtracted). Embedding lookups, LayerNorm, activations, softmax, the loss and the
optimiser are not counted; they are a few per cent of a transformer's FLOPs at most.

The causal convention is counted beside it: the FLOPs of every `F.scaled_dot_product_attention(...,
is_causal=True)` call are recorded (`causal_attention_*`, over the full T x T matrix), and the `*_causal`
figures count half of them, the share of the score and AV products a causal kernel has to compute
(T(T+1)/2 of the T^2 pairs, taken as exactly half). Other products (a recurrence's chunked scans, say)
are counted in full in both conventions.

Counting runs on the `meta` device where the model allows it, so even large presets allocate nothing, and
falls back to real CPU tensors for a model the meta device cannot run. Two things are added to torch's
formulas (`flop_counter`): torch counts the weight gradient of a grouped convolution (a depthwise one, say)
as if the convolution were dense, `groups` times too many FLOPs; and it has no formula for the fused
attention kernel that `scaled_dot_product_attention` runs on the CPU, so the fallback would count no
attention at all. That kernel is counted like the GPU ones.
"""

import contextlib
import re
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop, sdpa_flop_count

from languini.projects import load_project
from languini.train_lib.loss import lm_loss


def grouped_conv_backward_flops(grad_out, x, w, bias, stride, padding, dilation, transposed, output_padding,
                                groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of `aten.convolution_backward` (shapes in, as torch's formulas take them): torch's count of
    the input gradient, and its count of the weight gradient divided by `groups`. Torch's weight-gradient
    formula is a convolution of the input with the output gradient over all input channels, so a grouped
    convolution, whose output channels each see only `channels / groups` of them, is counted `groups`
    times over."""
    args = (grad_out, x, w, bias, stride, padding, dilation, transposed, output_padding, groups)
    input_grad = conv_backward_flop(*args, [output_mask[0], False, False], out_val=out_shape)
    weight_grad = conv_backward_flop(*args, [False, output_mask[1], False], out_val=out_shape)
    return input_grad + weight_grad // groups


def cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU's fused attention kernel (shapes in): Q K^T and P V, torch's formula for the GPU
    kernels."""
    return sdpa_flop_count(query, key, value)


def cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Its backward: the gradients of the two products, two forward passes, as on the meta device (where
    attention runs as plain matrix products). torch's formula for the fused kernels adds the score matrix
    the kernel recomputes; model FLOPs leave recomputation out."""
    return 2 * sdpa_flop_count(query, key, value)


def flop_counter(**kwargs) -> FlopCounterMode:
    """torch's FlopCounterMode with the grouped-convolution backward counted right and the CPU's fused
    attention kernel counted (keyword arguments are FlopCounterMode's)."""
    aten = torch.ops.aten
    formulas = {
        aten.convolution_backward: grouped_conv_backward_flops,
        aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops,
    }
    return FlopCounterMode(custom_mapping=formulas, **kwargs)


@dataclass
class FlopCount:
    """FLOPs of one step on `batch_size` sequences of `seq_len` tokens."""

    batch_size: int
    seq_len: int
    forward: int
    forward_backward: int
    by_module: dict = field(default_factory=dict)  # module pattern -> (forward, forward+backward)
    counted_on: str = "meta"
    causal_attention_forward: int = 0  # FLOPs inside causal scaled_dot_product_attention (full T x T)
    causal_attention_forward_backward: int = 0

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def forward_per_token(self) -> float:
        return self.forward / self.tokens

    @property
    def forward_backward_per_token(self) -> float:
        return self.forward_backward / self.tokens

    @property
    def forward_causal(self) -> float:
        """Forward FLOPs with causal attention counted as half of the full T x T score and AV products."""
        return self.forward - self.causal_attention_forward / 2

    @property
    def forward_backward_causal(self) -> float:
        return self.forward_backward - self.causal_attention_forward_backward / 2

    @property
    def forward_per_token_causal(self) -> float:
        return self.forward_causal / self.tokens

    @property
    def forward_backward_per_token_causal(self) -> float:
        return self.forward_backward_causal / self.tokens


def build_model(project: str, cfg, device) -> torch.nn.Module:
    """The project's `Model(cfg)`, created directly on `device` (the meta device allocates nothing)."""
    model_cls = load_project(project).Model
    with torch.device(device):
        return model_cls(cfg)


def param_counts(model: torch.nn.Module, vocab_size: int) -> tuple[int, int]:
    """(total, non-embedding) parameter counts; non-embedding excludes the token-embedding table only,
    as the original reports it (position embeddings and the output layer count as non-embedding)."""
    total = sum(p.numel() for p in model.parameters())
    token_tables = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.num_embeddings == vocab_size
    )
    return total, total - token_tables


def _module_totals(counter: FlopCounterMode) -> dict[str, int]:
    """FLOPs per module, with layer indices folded (`layers.3.mlp` -> `layers.*.mlp`); root = `(model)`."""
    totals: dict[str, int] = {}
    for name, ops in counter.get_flop_counts().items():
        if name == "Global":
            continue
        key = re.sub(r"\.\d+(?=\.|$)", ".*", name.partition(".")[2]) or "(model)"
        totals[key] = totals.get(key, 0) + sum(ops.values())
    return totals


def sdpa_forward_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """FLOPs of attention's two products over the full score matrix: Q K^T (2·T·S·d) and P V (2·T·S·d_v)
    per batch row and head; q [..., T, d], k [..., S, d], v [..., S, d_v]."""
    batch_heads = q.numel() // (q.shape[-2] * q.shape[-1])
    t, s, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    return 2 * batch_heads * t * s * (d + dv)


@contextlib.contextmanager
def _recording_causal_attention():
    """Within the block, every `F.scaled_dot_product_attention(..., is_causal=True)` call adds its forward
    FLOPs (sdpa_forward_flops) to the yielded list's first element."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention
    total = [0]

    def recording(query, key, value, *args, **kwargs):
        if kwargs.get("is_causal", len(args) >= 3 and args[2]):
            total[0] += sdpa_forward_flops(query, key, value)
        return original(query, key, value, *args, **kwargs)

    functional.scaled_dot_product_attention = recording
    try:
        yield total
    finally:
        functional.scaled_dot_product_attention = original


def _count(model, x, y, state, backward: bool) -> tuple[int, dict[str, int], int]:
    """(total FLOPs, FLOPs per module, forward FLOPs inside causal attention) of one step."""
    with flop_counter(display=False, depth=None) as counter, _recording_causal_attention() as causal:
        logits, _ = model(x, state)
        loss = lm_loss(logits, y)
        if backward:
            loss.backward()
    return counter.get_total_flops(), _module_totals(counter), causal[0]


def count_step_flops(project: str, cfg, batch_size: int = 1) -> FlopCount:
    """Count forward and forward+backward FLOPs of one training step of the config (meta device first,
    falling back to real CPU tensors for models with operations the meta device cannot run)."""
    for device in ("meta", "cpu"):
        try:
            model = build_model(project, cfg, device)
            tokens = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1), device=device)
            x, y = tokens[:, :-1], tokens[:, 1:]
            fwd, fwd_modules, causal = _count(model, x, y, model.get_init_state(batch_size, device), backward=False)
            both, both_modules, _ = _count(model, x, y, model.get_init_state(batch_size, device), backward=True)
        except (NotImplementedError, RuntimeError):
            if device == "cpu":
                raise
            continue
        by_module = {name: (fwd_modules.get(name, 0), both_modules[name]) for name in both_modules}
        # the backward pass of the two products costs two forward passes, as for every matmul
        return FlopCount(batch_size, cfg.seq_len, fwd, both, by_module, device, causal, 3 * causal)
    raise AssertionError("unreachable")


def analytic_gpt_forward_flops(cfg, batch_size: int = 1) -> int:
    """Forward FLOPs of the GPT model: 2 x matmul parameters x tokens plus attention's two T x T products.

    matmul parameters: per layer qkv (h x 3·inner), attention output (inner x h), MLP (2 x h x mlp), plus
    the output layer (h x vocab); inner = n_heads·head_dim. Attention: QK^T and AV, 2·T·T·inner each.
    """
    seq, h, inner = cfg.seq_len, cfg.h_dim, cfg.n_heads * cfg.head_dim
    per_layer = h * 3 * inner + inner * h + 2 * h * cfg.mlp_dim
    matmul_params = cfg.n_layers * per_layer + h * cfg.vocab_size
    attention = cfg.n_layers * 2 * (2 * seq * seq * inner)
    return batch_size * (2 * matmul_params * seq + attention)


def analytic_gpt_training_flops(cfg, batch_size: int = 1) -> int:
    """Forward + backward: the backward pass costs two forward passes (input and weight gradients)."""
    return 3 * analytic_gpt_forward_flops(cfg, batch_size)
