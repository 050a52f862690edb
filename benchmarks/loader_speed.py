"""Stream-dataloader throughput: prints JSON with tokens/s on one core.

    python3 benchmarks/loader_speed.py [--quick] [--data_path data/demo/demo_4096] [--batch_size 128] [--seq_len 512]

Always measures a synthetic corpus (random uint16 books written to a temporary folder); with --data_path it
also measures that prepared dataset (e.g. one made with `languini data prepare folder BOOKS.tar.xz`), with the batch
capped at the number of books of the split.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from tqdm import tqdm

from languini.common_lib.errors import UserError, exit_on_user_error
from languini.dataset_lib.languini_books import LanguiniDatasetIterator
from languini.dataset_lib.layout import read_books, write_file_list, write_token_file


def write_synthetic_corpus(data_root: str, n_books: int, mean_tokens: int, vocab_size: int = 16384) -> str:
    """Random books with lengths spread around `mean_tokens`; returns the dataset folder."""
    rng = np.random.default_rng(0)
    dataset_path = os.path.join(data_root, f"synth_{vocab_size}")
    rows = []
    for i, n in enumerate(rng.integers(mean_tokens // 2, mean_tokens * 3 // 2, n_books)):
        rel = f"files/book_{i:05d}.npy"
        write_token_file(os.path.join(dataset_path, rel), rng.integers(3, vocab_size, n), vocab_size)
        rows.append((rel, int(n)))
    write_file_list(data_root, "train", rows)
    return dataset_path


def measure(data_path: str, split: str, batch_size: int, seq_len: int, steps: int) -> dict:
    """Tokens/s of `steps` training batches (one process, all streams, batches on CPU)."""
    torch.set_num_threads(1)
    it = LanguiniDatasetIterator(
        data_path, split, batch_size, range(batch_size), 1, seq_len, "cpu", repeat=True
    )
    next(it)  # opens the first books
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=os.path.basename(os.path.normpath(data_path)), leave=False):
        next(it)
    seconds = time.perf_counter() - start
    return {
        "data_path": data_path,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "steps": steps,
        "seconds": round(seconds, 4),
        "tokens_per_second": round(steps * batch_size * seq_len / seconds),
    }


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: small corpus, few steps")
    parser.add_argument("--data_path", default="", help="also measure this prepared dataset folder")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=0, help="batches to time (default 2000, quick 100)")
    args = parser.parse_args(argv)
    steps = args.steps or (100 if args.quick else 2000)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        n_books, mean_tokens = (200, 20_000) if args.quick else (1000, 60_000)
        synthetic = write_synthetic_corpus(os.path.join(tmp, "synth"), n_books, mean_tokens)
        results["synthetic"] = measure(synthetic, "train", args.batch_size, args.seq_len, steps)
        results["synthetic"]["data_path"] = f"synthetic: {n_books} books of ~{mean_tokens} tokens"
    if args.data_path:
        if not os.path.isdir(args.data_path):
            raise UserError(f"no dataset folder at {args.data_path}")
        n_books = len(read_books(args.data_path, args.split))
        batch_size = min(args.batch_size, n_books)  # a repeating stream needs at least one book
        results["dataset"] = measure(args.data_path, args.split, batch_size, args.seq_len, steps)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
