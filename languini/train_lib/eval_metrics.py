"""Evaluation metrics: loss, perplexity, normalised perplexity, bits per byte, top-1/top-10 accuracy.

Every protocol accumulates the same six sums over the scored targets (padding is never scored):

    nats     Σ -log p(target)               n_tokens  scored targets
    n_chars  Σ characters they decode to     n_bytes   Σ UTF-8 bytes they decode to
    top1     targets ranked first            top10     targets among the 10 most likely

and turns them into metrics only at the end, after summing across ranks. Normalised perplexity
(docs/evaluation.md) is exp(nats / n_chars): a per-character figure that compares models across vocabularies.
"""

import math

import torch
import torch.distributed as dist

from languini.train_lib.distributed import World, all_reduce_sum
from languini.train_lib.loss import lm_loss
from languini.train_lib.token_lengths import TokenLengths

N_SUMS = 6  # nats, n_tokens, n_chars, n_bytes, top1, top10
TOP_K = 10


def zero_sums(device) -> torch.Tensor:
    return torch.zeros(N_SUMS, dtype=torch.float64, device=device)


def score_batch(
    logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor, lengths: TokenLengths | None = None
) -> torch.Tensor:
    """The six sums over the positions where `scored` is True. logits [..., V]; targets, scored [...]."""
    if scored.all():  # skip the copy of a boolean gather
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    else:
        logits, targets = logits[scored], targets[scored]
    nats = lm_loss(logits, targets, reduction="none").double().sum()
    top = logits.topk(min(TOP_K, logits.shape[-1]), dim=-1).indices
    hits = top == targets.unsqueeze(-1)
    if lengths is None:
        chars = nbytes = torch.zeros((), dtype=torch.int64, device=targets.device)
    else:
        chars, nbytes = lengths.chars[targets].sum(), lengths.bytes[targets].sum()
    counts = [targets.new_tensor(targets.numel()), chars, nbytes, hits[:, :1].sum(), hits.any(-1).sum()]
    return torch.stack([nats, *(c.double() for c in counts)])


def all_reduce_sums(sums: torch.Tensor, world: World | None = None) -> torch.Tensor:
    """Sum across the processes of `world`; with None, across all processes if torch.distributed runs."""
    if world is not None:
        return all_reduce_sum(sums, world)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return sums


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def metrics_from_sums(sums: torch.Tensor, with_chars: bool) -> dict:
    """The metric dict. Without token lengths (`with_chars` False) the character/byte metrics are None."""
    nats, n_tokens, n_chars, n_bytes, top1, top10 = sums.tolist()
    if n_tokens == 0:
        raise ValueError("no target was scored: the evaluation data is empty")
    loss = nats / n_tokens
    normalised_loss = nats / n_chars if with_chars else None
    return {
        "loss": loss,
        "ppl": _exp(loss),
        "normalised_loss": normalised_loss,
        "normalised_ppl": _exp(normalised_loss) if with_chars else None,
        "bits_per_byte": nats / math.log(2) / n_bytes if with_chars else None,
        "top1": top1 / n_tokens,
        "top10": top10 / n_tokens,
        "n_tokens": int(n_tokens),
        "n_chars": int(n_chars) if with_chars else None,
        "n_bytes": int(n_bytes) if with_chars else None,
    }


def unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel: evaluation runs a different number of forward passes
    per rank, so it must not go through DDP's per-forward collectives."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def evaluate_on_loader(
    model,
    loader,
    precision_ctx,
    max_steps: int | None,
    char_counts: TokenLengths | None = None,
    world: World | None = None,
) -> dict:
    """Validation during training: score every non-padded target of up to `max_steps` batches (-1/None: all).

    `loader` is a fresh `LanguiniDatasetIterator(..., repeat=False, micro_batches=1)`; its batches are
    [1, local_batch, seq_len]. Stateful models start from zero states, carried across the batches.
    `precision_ctx` is the autocast context (e.g. `autocast_context(precision, device)`) or a function
    returning one, `char_counts` the token lengths (None: token-level metrics only), `world` the processes
    to sum over (None: all, when torch.distributed is initialised). Returns the dict of `metrics_from_sums`.
    """
    model = unwrap_ddp(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lengths = char_counts.to(device) if char_counts is not None else None
    sums, state, step = zero_sums(device), None, 0
    with precision_ctx if hasattr(precision_ctx, "__enter__") else precision_ctx():
        while max_steps is None or max_steps < 0 or step < max_steps:
            try:
                x, y, is_padded = next(loader)
            except StopIteration:
                break
            x, y, is_padded = x[0], y[0], is_padded[0]
            if step == 0:
                state = model.get_init_state(x.shape[0], x.device)
            logits, state = model(x, state)
            sums += score_batch(logits, y, ~is_padded, lengths)
            step += 1
    model.train(was_training)
    return metrics_from_sums(all_reduce_sums(sums, world), with_chars=char_counts is not None)
