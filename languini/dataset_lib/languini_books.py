"""The stream dataloader of Languini Books (docs/dataloader.md).

The books of a split are dealt, in file-list order, to `global_batch_size` streams (each book to the stream
with the fewest tokens so far). A stream is its books concatenated, each followed by `<D>`; row i of every
batch is the next window of stream i: `seq_len + 1` tokens, consecutive windows sharing one token.
Train streams wrap around to their first book; eval streams are padded with 0 once their last `<D>` is read.

All streams advance by `seq_len` tokens per step, so the position of every stream follows from the number of
windows read: that count is the resumable state, valid on every rank and for every (GPUs, micro-steps) layout.
"""

import heapq
import os

import numpy as np
import torch

from languini.common_lib.errors import UserError
from languini.dataset_lib.layout import (
    END_OF_DOC,
    PAD,
    BadTokenFile,
    dataset_vocab,
    open_token_file,
    read_books,
)

BUFFER_TOKENS = 16384  # per stream: how far ahead the loader reads, in tokens (rounded to whole windows)


def stream_indices(rank: int, world_size: int, global_batch_size: int) -> list[int]:
    """Global stream indices owned by `rank` of `world_size`: every W-th stream, starting at `rank`."""
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside 0..{world_size - 1}")
    if global_batch_size % world_size:
        raise UserError(f"batch size {global_batch_size} is not divisible by {world_size} processes")
    return list(range(rank, global_batch_size, world_size))


def distribute_books(token_counts, n_streams: int) -> list[list[int]]:
    """Book indices of each stream: books in order, each to the stream with the fewest tokens (lowest index on ties)."""
    heap = [(0, s) for s in range(n_streams)]
    streams = [[] for _ in range(n_streams)]
    for book, count in enumerate(token_counts):
        tokens, s = heapq.heappop(heap)
        streams[s].append(book)
        heapq.heappush(heap, (tokens + int(count), s))
    return streams


def _open_book(dataset_path: str, rel_path: str, expected: int, vocab_size: int | None,
               check: bool = True) -> np.ndarray:
    """Memory-map one book's token file, checked against the file list (length) and the vocabulary (ids);
    with `check` False (checked before) only a failure to open it leads to the full check and its error."""
    if not check:
        try:
            return np.load(os.path.join(dataset_path, rel_path), mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError):
            pass
    try:
        return open_token_file(dataset_path, rel_path, expected, vocab_size)
    except BadTokenFile as e:
        raise UserError(f"{e}; the data is damaged: `languini data verify {dataset_path}` lists every problem, "
                        f"re-running `languini data prepare` repairs it") from None


def read_split_tokens(data_path: str, split: str, vocab_size: int | None = None) -> np.ndarray:
    """The whole split as one int64 stream (books in list order, `<D>` after every book), for the final eval.

    Token ids are checked against `vocab_size` (default: the one in meta.json, if any). Every book is opened
    and checked against its file list count before the stream is allocated, so a count that no token file
    holds (a damaged or crafted list) is named in one line instead of asking for that much memory.
    """
    vocab_size = vocab_size or dataset_vocab(data_path)
    books = [_open_book(data_path, rel, n, vocab_size) for rel, n in read_books(data_path, split)]
    out = np.empty(sum(len(b) for b in books) + len(books), dtype=np.int64)
    pos = 0
    for tokens in books:
        out[pos : pos + len(tokens)] = tokens
        out[pos + len(tokens)] = END_OF_DOC
        pos += len(tokens) + 1
    return out


class _Stream:
    """One stream: its books and where each starts in the stream (book j, then `<D>`, then book j+1...)."""

    def __init__(self, dataset_path, rows, books, end_of_doc_token, vocab_size):
        self.dataset_path, self.vocab_size = dataset_path, vocab_size
        self.paths = [rows[b][0] for b in books]
        self.lengths = np.array([rows[b][1] for b in books], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths + 1)])
        self.period = int(self.starts[-1])  # tokens of one pass, every `<D>` included
        self.end_of_doc_token = end_of_doc_token
        self._open = (-1, None)  # (book, memmap) of the last book read
        self._checked = set()  # books whose token file was checked (a wrapping stream reopens them)

    def locate(self, pos: int) -> tuple[int, int]:
        """(book index, offset) of stream position `pos` within one pass; offset == length means its `<D>`."""
        book = int(np.searchsorted(self.starts, pos, side="right")) - 1
        return book, pos - int(self.starts[book])

    def _book(self, book: int) -> np.ndarray:
        if self._open[0] != book:
            check = book not in self._checked
            tokens = _open_book(self.dataset_path, self.paths[book], int(self.lengths[book]), self.vocab_size, check)
            self._open = (book, tokens)
            self._checked.add(book)
        return self._open[1]

    def read(self, start: int, out: np.ndarray, repeat: bool):
        """Fill `out` with the stream's tokens from position `start` (wrapping, or padding with 0)."""
        filled, n = 0, len(out)
        while filled < n:
            pos = start + filled
            if repeat:
                pos %= self.period
            elif pos >= self.period:
                out[filled:] = PAD
                return
            book, offset = self.locate(pos)
            length = int(self.lengths[book])
            if offset < length:
                take = min(length - offset, n - filled)
                out[filled : filled + take] = self._book(book)[offset : offset + take]
                filled += take
            else:
                out[filled] = self.end_of_doc_token
                filled += 1


class LanguiniDatasetIterator:
    """Yields `(x, y, is_padded)` batches of this rank's streams, shaped `[micro_batches, rows, seq_len]`.

    `batch_idxs` are the global stream indices this rank owns (see `stream_indices`); rows of micro-batch m are
    the m-th of `micro_batches` contiguous groups of them. Only this rank's books are opened (memory-mapped).
    With `repeat=False` the iteration stops when every stream of the split (all ranks) is exhausted, so all
    ranks stop at the same step; exhausted streams meanwhile give rows that are all padding.
    Each book is checked when opened (`layout.open_token_file`): a damaged token file or an id >= `vocab_size`
    (default: the one in meta.json, if any) stops with one line naming the file.
    """

    def __init__(
        self,
        data_path: str,
        split: str,
        global_batch_size: int,
        batch_idxs,
        micro_batches: int,
        sequence_length: int,
        device,
        end_of_doc_token: int = END_OF_DOC,
        repeat: bool = True,
        vocab_size: int | None = None,
    ):
        batch_idxs = [int(i) for i in batch_idxs]
        _check_layout(global_batch_size, batch_idxs, micro_batches, sequence_length)
        self.split = split
        self.global_batch_size = global_batch_size
        self.batch_idxs = batch_idxs
        self.micro_batches = micro_batches
        self.seq_len = sequence_length
        self.device = torch.device(device)
        self.repeat = repeat

        rows = read_books(data_path, split)
        books = distribute_books([n for _, n in rows], global_batch_size)
        periods = [sum(rows[b][1] + 1 for b in bs) for bs in books]
        if repeat and min(periods) == 0:
            raise UserError(
                f"split '{split}' has {len(rows)} books, too few for {global_batch_size} streams that repeat; "
                f"use a batch size of at most {len(rows)} or a larger split"
            )
        vocab_size = vocab_size or dataset_vocab(data_path)
        self.streams = [_Stream(data_path, rows, books[i], end_of_doc_token, vocab_size) for i in batch_idxs]
        self._periods = np.array([s.period for s in self.streams], dtype=np.int64)
        # Eval: windows until the last real target of the longest stream of the whole split.
        self.num_batches = None if repeat else max(max(0, -(-(p - 1) // sequence_length)) for p in periods)

        self._windows_per_fill = max(1, BUFFER_TOKENS // sequence_length)
        self._buffer = np.empty(
            (len(batch_idxs), self._windows_per_fill * sequence_length + 1), dtype=np.int64
        )
        self._windows = 0  # windows read so far by every stream: the whole resumable state
        self._buffer_start = None  # first window held in the buffer (None: nothing loaded)

    def __iter__(self):
        return self

    def __next__(self):
        if self.num_batches is not None and self._windows >= self.num_batches:
            raise StopIteration
        k, L = self._windows, self.seq_len
        if self._buffer_start is None or k >= self._buffer_start + self._windows_per_fill:
            self._fill(k)
        a = (k - self._buffer_start) * L
        shape = (self.micro_batches, len(self.batch_idxs) // self.micro_batches, L)
        x = torch.from_numpy(np.ascontiguousarray(self._buffer[:, a : a + L])).view(shape)
        y = torch.from_numpy(np.ascontiguousarray(self._buffer[:, a + 1 : a + L + 1])).view(shape)
        if self.repeat:
            is_padded = torch.zeros(shape, dtype=torch.bool)
        else:  # a target at stream position p is padding once p is past the stream's last `<D>`
            target_pos = k * L + 1 + np.arange(L)
            is_padded = torch.from_numpy(target_pos[None, :] >= self._periods[:, None]).view(shape)
        self._windows += 1
        return (
            x.to(self.device, non_blocking=True),
            y.to(self.device, non_blocking=True),
            is_padded.to(self.device, non_blocking=True),
        )

    def _fill(self, first_window: int):
        """Read the next windows of every stream into the buffer (the only loop over streams)."""
        start = first_window * self.seq_len
        for row, stream in enumerate(self.streams):
            stream.read(start, self._buffer[row], self.repeat)
        self._buffer_start = first_window

    def _positions(self) -> list[list[int]]:
        """[global stream index, book index, offset] of every own stream's next window (book == #books: done)."""
        out = []
        for idx, stream in zip(self.batch_idxs, self.streams):
            pos = self._windows * self.seq_len
            if self.repeat:
                book, offset = stream.locate(pos % stream.period)
            elif pos >= stream.period:
                book, offset = len(stream.paths), 0
            else:
                book, offset = stream.locate(pos)
            out.append([idx, book, offset])
        return out

    def _identity(self) -> dict:
        """What a saved state must agree on to be loadable here."""
        return {
            "split": self.split,
            "global_batch_size": self.global_batch_size,
            "sequence_length": self.seq_len,
            "repeat": self.repeat,
        }

    def state_dict(self) -> dict:
        """Plain ints and lists (checkpoint- and JSON-friendly); loads on any rank of any layout."""
        return {**self._identity(), "windows": self._windows, "streams": self._positions()}

    def load_state_dict(self, state: dict):
        """Continue exactly where the iterator that saved `state` stopped."""
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise UserError(
                    f"loader state was saved with {key}={state.get(key)!r} but this loader has {key}={value!r}; "
                    f"resume with the same config"
                )
        self._windows = int(state["windows"])
        self._buffer_start = None
        saved = {idx: [book, offset] for idx, book, offset in state.get("streams", [])}
        for idx, book, offset in self._positions():
            if idx in saved and saved[idx] != [book, offset]:
                raise UserError(
                    f"loader state does not match the data: stream {idx} was at book {saved[idx][0]} offset "
                    f"{saved[idx][1]}, but this dataset puts it at book {book} offset {offset}"
                )


def _check_layout(global_batch_size, batch_idxs, micro_batches, sequence_length):
    if global_batch_size < 1 or sequence_length < 1 or micro_batches < 1:
        raise UserError(
            f"batch size ({global_batch_size}), sequence length ({sequence_length}) and micro-batches "
            f"({micro_batches}) must all be positive"
        )
    if not batch_idxs:
        raise UserError("this process owns no streams: batch_idxs is empty")
    bad = [i for i in batch_idxs if not 0 <= i < global_batch_size]
    if bad:
        raise UserError(f"batch_idxs {bad} are outside 0..{global_batch_size - 1} (global batch size)")
    if len(set(batch_idxs)) != len(batch_idxs):
        raise UserError("batch_idxs contains repeated stream indices")
    if len(batch_idxs) % micro_batches:
        raise UserError(
            f"local batch size {len(batch_idxs)} is not divisible by {micro_batches} micro-batches "
            f"(gradient accumulation steps)"
        )
