"""The final evaluation protocols over one stream of a whole split (docs/evaluation.md).

The split is read as ONE token stream (`read_split_tokens`: books in list order, `<D>` between books and
at the end). Target t is stream token t predicted from the tokens before it; every target 1..N-1 is scored
exactly once.

* `sliding_window` (GPT): windows of seq_len tokens with stride last_n. The first window scores all its
  targets, every later window only its last last_n, so each scored target sees at least
  seq_len - last_n tokens of context. Windows are independent, so they are batched (and split across
  ranks); the sums equal those of scoring one window at a time.
* `stateful` (RNNs): consecutive chunks of seq_len tokens, one stream, the state carried through the
  whole split. The last chunk is padded; padded targets are never scored.

Each protocol returns the six sums of `evaluation.score_batch` for this rank's share of the work.
"""

import math

import numpy as np
import torch
from tqdm import tqdm

from languini.common_lib.errors import UserError
from languini.train_lib.eval_metrics import score_batch, zero_sums
from languini.train_lib.token_lengths import TokenLengths


def window_starts(n_tokens: int, seq_len: int, last_n: int) -> np.ndarray:
    """Start offsets of the sliding windows that score all n_tokens - 1 targets of a stream."""
    if not 0 < last_n <= seq_len:
        raise UserError(f"--last_n must be in 1..seq_len ({seq_len}); got {last_n}")
    beyond_first = max(0, n_tokens - 1 - seq_len)
    return np.arange(1 + math.ceil(beyond_first / last_n), dtype=np.int64) * last_n


def window_batch(stream: np.ndarray, n_tokens: int, starts: np.ndarray, seq_len: int, last_n: int):
    """Inputs, targets and scored mask ([len(starts), seq_len] each) of the windows at `starts`.

    `stream` is the split's tokens followed by at least seq_len + 1 padding zeros.
    """
    positions = starts[:, None] + np.arange(seq_len + 1)
    window = torch.from_numpy(stream[positions].astype(np.int64))
    target_pos = torch.from_numpy(positions[:, 1:])
    in_tail = torch.arange(seq_len) >= seq_len - last_n
    scored = (in_tail | torch.from_numpy(starts == 0)[:, None]) & (target_pos < n_tokens)
    return window[:, :-1], window[:, 1:], scored


def _padded(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    if len(tokens) < 2:
        raise UserError("the split has fewer than 2 tokens: nothing to evaluate")
    return np.concatenate([tokens, np.zeros(seq_len + 1, dtype=tokens.dtype)])


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_sliding_window(
    model,
    tokens: np.ndarray,
    seq_len: int,
    last_n: int,
    batch_size: int,
    precision_ctx,
    lengths: TokenLengths | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> torch.Tensor:
    """Sums over this rank's windows (window i goes to rank i % world_size), `batch_size` at a time."""
    device = _model_device(model)
    stream = _padded(tokens, seq_len)
    starts = window_starts(len(tokens), seq_len, last_n)[rank::world_size]
    sums = zero_sums(device)
    batches = range(0, len(starts), batch_size)
    with precision_ctx:
        for i in tqdm(batches, desc="windows", unit="batch", disable=not progress, dynamic_ncols=True):
            x, y, scored = window_batch(stream, len(tokens), starts[i : i + batch_size], seq_len, last_n)
            tail = seq_len - last_n if not scored[:, : seq_len - last_n].any() else 0  # no first window in it
            x, y, scored = x.to(device), y[:, tail:].to(device), scored[:, tail:].to(device)
            logits, _ = model(x, model.get_init_state(x.shape[0], device))
            sums += score_batch(logits[:, tail:], y, scored, lengths)
    return sums


@torch.no_grad()
def evaluate_stateful(
    model,
    tokens: np.ndarray,
    seq_len: int,
    last_n: int,
    batch_size: int,
    precision_ctx,
    lengths: TokenLengths | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> torch.Tensor:
    """Sums over the whole split as one stream with the state carried through (`last_n`, `batch_size`
    unused). The stream cannot be split, so only rank 0 works; the other ranks return zeros."""
    device = _model_device(model)
    sums = zero_sums(device)
    if rank != 0:
        return sums
    stream = _padded(tokens, seq_len)
    starts = np.arange(0, len(tokens) - 1, seq_len, dtype=np.int64)
    state = model.get_init_state(1, device)
    with precision_ctx:
        for start in tqdm(starts, desc="chunks", unit="chunk", disable=not progress, dynamic_ncols=True):
            x, y, scored = window_batch(stream, len(tokens), start[None], seq_len, seq_len)
            x, y, scored = x.to(device), y.to(device), scored.to(device)
            logits, state = model(x, state)
            sums += score_batch(logits, y, scored, lengths)
    return sums


PROTOCOLS = {"sliding_window": evaluate_sliding_window, "stateful": evaluate_stateful}
