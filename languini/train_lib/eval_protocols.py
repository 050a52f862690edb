"""The final evaluation protocols over one stream of a whole split (docs/evaluation.md).

The split is read as ONE token stream (`read_split_tokens`: books in list order, `<D>` between books and
at the end). Target t is stream token t predicted from the tokens before it; every target 1..N-1 is scored
exactly once.

* `sliding_window` (GPT): windows of seq_len tokens with stride last_n. The first window scores all its
  targets, every later window only its last last_n, so each scored target sees at least
  seq_len - last_n tokens of context. Windows are independent, so they are batched (and split across
  ranks); the sums equal those of scoring one window at a time.
* `stateful` (RNNs): consecutive chunks of seq_len tokens, the state carried through. With one stream
  (the default) the whole split is one stream. With B streams the books are dealt to B streams exactly as
  the training loader deals them (`distribute_books`), each stream starts from a zero state and carries it
  through its own books, and the B streams are read as the B rows of each chunk. The last chunk of a
  stream is padded; padded targets are never scored. A stream's first token has no context and is not a
  target, so B streams score `tokens - B` targets.

`cap_tokens` keeps the first N tokens of the split's stream (the `--max_tokens` of eval.py): the same
prefix for every protocol and every number of streams.

Each protocol returns the six sums of `evaluation.score_batch` for this rank's share of the work.
"""

import math

import numpy as np
import torch
from tqdm import tqdm

from languini.common_lib.errors import UserError
from languini.dataset_lib.languini_books import distribute_books
from languini.train_lib.eval_metrics import score_batch, zero_sums
from languini.train_lib.token_lengths import TokenLengths


def check_last_n(last_n: int, seq_len: int):
    """A sliding window scores 1..seq_len tokens at its end; anything else is one line."""
    if not 0 < last_n <= seq_len:
        raise UserError(f"--last_n must be in 1..seq_len ({seq_len}); got {last_n}")


def window_starts(n_tokens: int, seq_len: int, last_n: int) -> np.ndarray:
    """Start offsets of the sliding windows that score all n_tokens - 1 targets of a stream."""
    check_last_n(last_n, seq_len)
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


def cap_tokens(tokens: np.ndarray, max_tokens: int) -> np.ndarray:
    """The first `max_tokens` tokens of the split's stream (0: all of them)."""
    if max_tokens < 0:
        raise UserError(f"--max_tokens must be 0 (all) or positive; got {max_tokens}")
    return tokens if max_tokens == 0 else tokens[:max_tokens]


def stream_rows(tokens: np.ndarray, book_lengths, n_streams: int) -> list[np.ndarray]:
    """The split's stream `tokens` (books in list order, each followed by `<D>`, possibly cut short by a
    cap) as `n_streams` streams: the books dealt as the training loader deals them, each stream its books
    (with their `<D>`) in order. Streams that get no book are empty."""
    if n_streams < 1:
        raise UserError(f"--eval_streams must be at least 1; got {n_streams}")
    ends = np.cumsum(np.asarray(book_lengths, dtype=np.int64) + 1)
    n_books = int(np.searchsorted(ends, len(tokens), side="left")) + 1 if len(tokens) else 0
    n_books = min(n_books, len(ends))
    starts = np.concatenate([[0], ends[:-1]])
    # greedy dealing only looks at the books before: the prefix of books is dealt as in the full split
    dealt = distribute_books(list(book_lengths)[:n_books], n_streams)
    return [
        np.concatenate([tokens[starts[b] : min(ends[b], len(tokens))] for b in books]).astype(np.int64)
        if books
        else np.zeros(0, dtype=np.int64)
        for books in dealt
    ]


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
    n_streams: int = 1,
    book_lengths=None,
) -> torch.Tensor:
    """Sums over the split read as `n_streams` streams, each carrying its state from a zero state through
    its books (`last_n`, `batch_size` unused). Stream i goes to rank i % world_size, so with one stream
    only rank 0 works and the other ranks return zeros. `book_lengths` (the token count of every book, in
    list order) is needed for more than one stream."""
    device = _model_device(model)
    sums = zero_sums(device)
    if n_streams == 1:
        streams = [tokens]
    elif book_lengths is None:
        raise ValueError("more than one stream needs the books' lengths")
    else:
        streams = stream_rows(tokens, book_lengths, n_streams)
    if sum(len(s) for s in streams) < 2:
        raise UserError("the split has fewer than 2 tokens: nothing to evaluate")
    own = [s for s in streams[rank::world_size] if len(s) >= 2]
    if not own:
        return sums
    longest = max(len(s) for s in own)
    rows = np.zeros((len(own), longest + seq_len + 1), dtype=np.int64)
    for i, s in enumerate(own):
        rows[i, : len(s)] = s
    n_real = torch.tensor([len(s) for s in own])[:, None]
    starts = np.arange(0, longest - 1, seq_len, dtype=np.int64)
    state = model.get_init_state(len(own), device)
    with precision_ctx:
        for start in tqdm(starts, desc="chunks", unit="chunk", disable=not progress, dynamic_ncols=True):
            window = torch.from_numpy(rows[:, start : start + seq_len + 1])
            target_pos = int(start) + 1 + torch.arange(seq_len)
            scored = target_pos[None, :] < n_real
            x, y, scored = window[:, :-1].to(device), window[:, 1:].to(device), scored.to(device)
            logits, state = model(x, state)
            sums += score_batch(logits, y, scored, lengths)
    return sums


PROTOCOLS = {"sliding_window": evaluate_sliding_window, "stateful": evaluate_stateful}
