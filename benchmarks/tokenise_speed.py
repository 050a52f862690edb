"""Tokenisation speed (text MB/s) of `languini data prepare` with 1 and 2 worker processes.

Reads books of the shared Gutenberg archive (header/footer stripped), trains a tokenizer on them once, then
times `tokenise_books` (read + clean + encode + atomic write, progress off) per worker count. Prints JSON:
wall-clock MB/s and, robust to a busy machine, MB per CPU-second (worker start-up included).

    python3 benchmarks/tokenise_speed.py [--quick] [--archive BOOKS.tar.xz]
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time

from languini.common_lib.atomic_io import atomic_write_bytes
from languini.common_lib.errors import exit_on_user_error
from languini.dataset_lib.sources import folder, load_text
from languini.dataset_lib.splits import choose_subset
from languini.dataset_lib.tokenise_books import tokenise_books
from languini.dataset_lib.tokenizer_model import train_tokenizer

DEFAULT_ARCHIVE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gutenberg-400.tar.xz")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (worker processes included once they exit)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", default=DEFAULT_ARCHIVE)
    parser.add_argument("--books", type=int, default=100, help="books to tokenise (hash-chosen subset)")
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="8 books, vocab 4096: checks the script runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.books, args.vocab_size = 8, 4096

    with folder.open_books(args.archive) as (refs, _), tempfile.TemporaryDirectory() as tmp:
        refs = choose_subset(refs, args.books)
        texts = [load_text(r) for r in refs]
        text_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        start = time.perf_counter()
        model = train_tokenizer(texts, args.vocab_size, num_threads=max(args.workers))
        train_seconds = time.perf_counter() - start
        model_path = os.path.join(tmp, "tokenizer.model")
        atomic_write_bytes(model_path, model)
        runs = []
        for workers in args.workers:
            out = os.path.join(tmp, f"w{workers}")
            start, cpu_start = time.perf_counter(), cpu_seconds()
            tokens = sum(r.tokens for r in tokenise_books(refs, out, model_path, args.vocab_size, workers, False))
            seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
            runs.append({"workers": workers, "seconds": round(seconds, 3), "mb_per_s": round(text_mb / seconds, 2),
                         "tokens_per_s": round(tokens / seconds), "cpu_seconds": round(cpu, 3),
                         "mb_per_cpu_second": round(text_mb / cpu, 2)})
    print(json.dumps({
        "benchmark": "tokenise_speed", "books": len(refs), "text_mb": round(text_mb, 2), "tokens": tokens,
        "vocab_size": args.vocab_size, "tokenizer_train_seconds": round(train_seconds, 2),
        "cpu_count": os.cpu_count(), "runs": runs,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
