"""Books -> token files: each book's cleaned text tokenised into its own token file, in parallel processes
with a progress bar, resumable and atomic (the SentencePiece model itself is `tokenizer_model.py`'s).

A token file is written atomically (temp file + rename), so a file that exists is complete: a re-run
skips it and only re-reads the book's text for the split statistics and its content hash (a damaged one
is written again).
"""

import dataclasses
import functools
import hashlib
import multiprocessing
import os
import time

import numpy as np
from tqdm import tqdm

from languini.dataset_lib.layout import write_token_file
from languini.dataset_lib.sources import BadBook, BookRef, load_text
from languini.dataset_lib.tokenizer_model import load_processor

CHUNK_CHARS = 1 << 16
_WORKER: dict = {}  # per process: the SentencePiece processor and whether books may be cut at newlines


@dataclasses.dataclass
class BookResult:
    book_id: str
    tokens: int = 0
    text_bytes: int = 0
    chars: int = 0
    skipped: str | None = None  # why the book was left out
    sha256: str | None = None  # of the cleaned text (UTF-8): the book's content hash


def newline_chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut text after a newline roughly every `size` characters."""
    chunks, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        chunks.append(text[start:end])
        start = end
    return chunks


def encode_text(sp, text: str, cut_at_newlines: bool, num_threads: int = -1) -> np.ndarray:
    """Token ids of a whole book.

    When no vocabulary piece contains a newline (true for models trained line by line, like ours and the
    original's), no token spans a line break, so encoding newline-cut chunks as one batch gives the same ids
    as encoding the book in one piece, only faster.
    """
    if not cut_at_newlines or len(text) <= CHUNK_CHARS:
        return np.asarray(sp.encode(text), dtype=np.int64)
    parts = sp.encode(newline_chunks(text), num_threads=num_threads)  # a batch: threaded by sentencepiece
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])


def _init_worker(model_path: str, encode_threads: int):
    """Load the tokenizer once per process. One process encodes with every core (sentencepiece threads a
    batch); in a pool of several, each encodes with one thread so the pool does not oversubscribe."""
    sp = load_processor(model_path)
    _WORKER["sp"], _WORKER["threads"] = sp, encode_threads
    _WORKER["cut"] = not any("\n" in sp.id_to_piece(i) for i in range(sp.get_piece_size()))


def finished_count(path: str) -> int | None:
    """Length of an existing token file, or None when it is damaged (it is then tokenised again)."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
    intact = tokens.ndim == 1 and tokens.offset + tokens.nbytes == os.path.getsize(path)
    return int(tokens.shape[0]) if intact else None


def process_book(ref: BookRef, dataset_path: str, vocab_size: int) -> BookResult:
    """Tokenise one book unless its token file already exists; return its statistics."""
    try:
        text = load_text(ref)
    except BadBook as e:
        return BookResult(ref.book_id, skipped=str(e))
    if not text:
        return BookResult(ref.book_id, skipped=f"{ref.origin} is empty after cleaning")
    out = os.path.join(dataset_path, ref.token_file)  # checked to lie inside the dataset by `prepare`
    tokens = finished_count(out) if os.path.isfile(out) else None
    if tokens is None:
        ids = encode_text(_WORKER["sp"], text, _WORKER["cut"], _WORKER["threads"])
        write_token_file(out, ids, vocab_size)
        tokens = len(ids)
    data = text.encode("utf-8")
    return BookResult(ref.book_id, tokens, len(data), len(text), sha256=hashlib.sha256(data).hexdigest())


def tokenise_books(refs: list[BookRef], dataset_path: str, model_path: str, vocab_size: int, workers: int,
                   progress: bool = True):
    """Yield a BookResult per book (in completion order) while tokenising with `workers` processes."""
    task = functools.partial(process_book, dataset_path=dataset_path, vocab_size=vocab_size)
    bar = tqdm(total=len(refs), unit="book", desc="tokenising", disable=not progress, dynamic_ncols=True)
    start, done_bytes = time.perf_counter(), 0
    with bar:
        if workers <= 1:
            _init_worker(model_path, -1)
            results = map(task, refs)
            pool = None
        else:
            pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (model_path, 1))
            results = pool.imap_unordered(task, refs)
        try:
            for result in results:
                done_bytes += result.text_bytes
                bar.set_postfix_str(f"{done_bytes / 1e6 / (time.perf_counter() - start):.1f} MB/s", refresh=False)
                bar.update()
                yield result
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
