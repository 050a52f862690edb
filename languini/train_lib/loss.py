"""Language-modelling loss shared by the trainer, evaluation and throughput tools.

The loss is always accumulated in fp32. With fp32 logits (and inside torch.compile, which fuses the
upcast into the softmax) it is plain `F.cross_entropy`. With bf16/fp16 logits in eager mode, the mean
loss goes through `ChunkedCrossEntropy`: it upcasts `CHUNK_TOKENS` rows at a time and keeps only the
low-precision logits and one fp32 log-normaliser per token for the backward pass, instead of the fp32
copy and fp32 log-softmax (4 + 4 bytes per logit) that `F.cross_entropy(logits.float())` holds.
"""

import torch
import torch.nn.functional as F

CHUNK_TOKENS = 8192  # rows upcast at once; one fp32 chunk buffer is 512 MiB at a 16k vocabulary


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of low-precision logits [N, V] against targets [N], fp32 math chunk by chunk.

    Same function and same gradient formula as `F.cross_entropy(logits.float(), targets)`: the gradient
    (softmax - one_hot) * grad_output / N is computed in fp32 and rounded once to the logits' dtype.
    The softmax is recomputed in the backward pass from the saved logits and log-normalisers.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        target_logits = torch.empty_like(lse)
        for start in range(0, logits.shape[0], CHUNK_TOKENS):
            rows = slice(start, start + CHUNK_TOKENS)
            part = logits[rows].float()
            lse[rows] = torch.logsumexp(part, dim=-1)
            target_logits[rows] = part.gather(1, targets[rows, None]).squeeze(1)
        ctx.save_for_backward(logits, targets, lse)
        return (lse - target_logits).mean()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        scale = grad_output.float() / logits.shape[0]
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], CHUNK_TOKENS):
            rows = slice(start, start + CHUNK_TOKENS)
            probs = logits[rows].float().sub_(lse[rows, None]).exp_()
            probs.scatter_add_(1, targets[rows, None], torch.full_like(probs[:, :1], -1.0))
            grad[rows] = probs.mul_(scale)
        return grad, None


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of next-token logits [..., V] against targets [...], accumulated in fp32."""
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if logits.dtype == torch.float32 or reduction != "mean" or torch.compiler.is_compiling():
        return F.cross_entropy(logits.float(), targets, reduction=reduction)
    return ChunkedCrossEntropy.apply(logits, targets)
