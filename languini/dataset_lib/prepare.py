"""`languini data prepare`: splits, tokenizer, token files, file lists and, written last, meta.json.

Resumable: a marker file records the preparation's fingerprint (input listing + settings); a re-run with
the same fingerprint keeps the tokenizer and every finished token file. A finished dataset (meta.json with
the same fingerprint, intact token files, file lists and counts) makes a re-run a fast no-op.
The corpus folder is locked (`common_lib.file_lock`) while a preparation writes into it.

meta.json records a content hash of every book (`book_sha256`: split -> token file -> SHA-256 of the
cleaned text), which `add_split` compares with the train books. Splits added later by `add_split` (their
entry in `splits` has an `added` record) are kept when a re-run of prepare repairs the dataset.

The same hashes keep trained-on text out of the held-out splits: a held-out book (of `test` or any other
split but `train`) whose content hash equals a train book's is dropped, and of several held-out books with
the same content in one split only the first (in data order) is kept; train stays as assigned. The hash is
the SHA-256 of the cleaned UTF-8 text (the text that is tokenised, as `tokenise_books` records it), so
copies that differ only in what the source's cleaning removes (for Gutenberg books: the licence header and
footer, CRLF line ends, outer blank lines) count as the same book; no further normalisation is done, so any
other difference (a changed word, re-wrapped lines, other whitespace or Unicode forms) makes two books
different. A dropped book is tokenised like the others (its hash comes from that) and then its token file
is deleted; the dropped books are listed in meta.json (`duplicates`: book id -> its split and the book it
repeats), and the file lists, counts, `splits` statistics, `book_sha256` and file manifest describe the
books that remain. The fingerprint is that of the assigned splits and the choice depends only on the
books' texts and the split order, so an interrupted run resumes, a finished one is still a no-op, and a
repair drops the same books. Books of a source's own split lists kept unchanged (books3 `--split-lists`,
whose lists and token counts reproduce the published ones) are never dropped: overlaps are only reported.
"""

import dataclasses
import datetime
import errno
import glob
import hashlib
import json
import os
import sys

from tqdm import tqdm

from languini import __version__
from languini.common_lib.atomic_io import atomic_write_bytes, atomic_write_json
from languini.common_lib.errors import UserError
from languini.common_lib.file_lock import exclusive_lock
from languini.dataset_lib.integrity_test import file_sizes, integrity_hash
from languini.dataset_lib.layout import (
    END_OF_DOC,
    path_inside,
    read_file_list,
    read_meta,
    split_counts_path,
    split_list_name,
    write_file_list,
    write_split_counts,
)
from languini.dataset_lib.sources import BadBook, BookRef, load_text
from languini.dataset_lib.splits import assign_splits, choose_subset, held_out_duplicates
from languini.dataset_lib.tokenise_books import tokenise_books
from languini.dataset_lib.tokenizer_model import SETTINGS, load_processor, model_file_bytes, train_tokenizer
from languini.dataset_lib.verify import compare_manifests

FORMAT = 1
MARKER = ".prepare-in-progress.json"
# The smallest vocabulary the tokenizer can have: the special ids 0..2, SentencePiece's 256 byte-fallback
# pieces and at least one character (a real corpus needs one piece per character it uses, a few dozen more).
MIN_VOCAB_SIZE = END_OF_DOC + 1 + 256 + 1


@dataclasses.dataclass
class PrepareOptions:
    out: str  # corpus folder holding the file lists, e.g. data/demo
    name: str  # corpus name: the dataset folder is <out>/<name>_<vocab>
    vocab_size: int | None = None  # None: the --tokenizer's size
    test_fraction: float = 0.1
    split_by: str = "book"  # or "author"
    tokenizer: str | None = None  # an existing SentencePiece model to reuse instead of training
    workers: int = 1
    strict: bool = False
    max_books: int | None = None
    progress: bool = True


class BadBooks:
    """Skips unusable books with one warning each, or stops with --strict."""

    def __init__(self, strict: bool):
        self.strict, self.skipped = strict, {}

    def __call__(self, book_id: str, reason: str):
        if self.strict:
            raise UserError(f"{reason} (--strict: fix or remove it, or run without --strict to skip it)")
        if book_id not in self.skipped:
            print(f"warning: skipping {reason}", file=sys.stderr)
            self.skipped[book_id] = reason

    def texts(self, refs: list[BookRef]):
        for ref in refs:
            try:
                yield load_text(ref)
            except BadBook as e:
                self(ref.book_id, str(e))


def _fingerprint(kind: str, splits: dict[str, list[BookRef]], opts: PrepareOptions, vocab: int,
                 tokenizer_sha: str | None) -> str:
    listing = [[split, r.book_id, r.size] for split, refs in splits.items() for r in refs]
    settings = {"format": FORMAT, "kind": kind, "vocab_size": vocab, "test_fraction": opts.test_fraction,
                "split_by": opts.split_by, "tokenizer": tokenizer_sha, "listing": listing}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# A token file is written as the temporary `.<name>.XXXXXXXX.tmp` first (atomic_io): its name must fit too.
NAME_MAX = 255
MAX_TOKEN_FILE_NAME = NAME_MAX - len("..XXXXXXXX.tmp")


def os_error_message(e: OSError) -> UserError:
    """The one-line error for a failed read or write while preparing (disk full, read-only, ulimit -f...)."""
    where = e.filename or "the output folder"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"disk full while writing {where}; free some space and re-run (finished books are kept)")
    if e.errno == errno.EFBIG:
        return UserError(f"file too large while writing {where}: over the file size limit (`ulimit -f`) "
                         f"or the file system's; raise the limit and re-run")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return UserError(f"cannot write {where}: {e.strerror}; choose another --out")
    return UserError(f"cannot read or write {where}: {e.strerror or e}")


def check_counts(vocab_size: int | None, max_books: int | None):
    """Refuse a --vocab-size the tokenizer cannot have or a --max-books that is not a count of books, before
    a source is opened or anything is written."""
    if vocab_size is not None and vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"--vocab-size must be at least {MIN_VOCAB_SIZE} (the special ids 0..{END_OF_DOC} and 256 "
                        f"byte pieces, plus one per character of the books; e.g. 4096); got {vocab_size}")
    if max_books is not None and max_books < 1:
        raise UserError(f"--max-books must be at least 1 (leave it out to use every book); got {max_books}")


def prepare(refs: list[BookRef], description: dict, opts: PrepareOptions) -> dict:
    """Prepare the dataset <opts.out>/<opts.name>_<vocab> from the source's books; return its meta.json."""
    try:
        return _prepare(refs, description, opts)
    except OSError as e:
        raise os_error_message(e) from None


def _marker_record(marker: str) -> dict:
    """What an unfinished preparation recorded (fingerprint, added splits); a damaged marker is refused."""
    try:
        with open(marker, encoding="utf-8") as f:
            recorded = json.load(f)
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict):
        folder = os.path.dirname(marker)
        raise UserError(f"{marker} is damaged; remove {folder} and prepare the data again")
    return recorded


def _check_resumable(dataset_path: str, fingerprint: str) -> dict:
    """The finished dataset's meta (same fingerprint) or {}; refuse folders made from other input."""
    meta = read_meta(dataset_path)
    other = f"{dataset_path} holds a dataset prepared from other books or settings; choose another --out or remove it"
    if meta:
        if meta.get("fingerprint") != fingerprint:
            raise UserError(other)
        return meta
    marker = os.path.join(dataset_path, MARKER)
    if os.path.isfile(marker):
        if _marker_record(marker).get("fingerprint") != fingerprint:
            raise UserError(other)
    elif os.path.isdir(dataset_path) and os.listdir(dataset_path):
        raise UserError(f"{dataset_path} exists and was not made by `languini data prepare`; choose another --out")
    return {}


def _resolve_vocab(opts: PrepareOptions) -> tuple[int, bytes | None]:
    """(vocabulary size, the --tokenizer model's bytes or None)."""
    if opts.tokenizer is None:
        return opts.vocab_size, None
    model = model_file_bytes(opts.tokenizer)
    model_vocab = load_processor(model).get_piece_size()
    if opts.vocab_size not in (None, model_vocab):
        raise UserError(f"--vocab-size {opts.vocab_size} differs from the --tokenizer's {model_vocab}")
    return model_vocab, model


def _missing_lists(data_root: str, dataset_path: str, splits) -> list[str]:
    """The file lists and per-dataset count files of `splits` that are not there."""
    paths = [os.path.join(data_root, split_list_name(s)) for s in splits]
    paths += [split_counts_path(dataset_path, s) for s in splits]
    return [p for p in paths if not os.path.isfile(p)]


def _repair_or_finish(data_root: str, dataset_path: str, meta: dict) -> bool:
    """For a finished dataset: True when intact; else delete its resized token files so they are redone.

    A missing file list or count file is not intact either: the re-run writes it again. The files of splits
    added by `add_split` are left alone: re-running its command repairs them.
    """
    added = added_splits(meta)
    theirs = tuple(f"files/{name}/" for name in added)
    expected = {p: n for p, n in meta.get("files", {}).items() if not p.startswith(theirs)}
    actual = {p: n for p, n in file_sizes(os.path.join(dataset_path, "files"), dataset_path).items()
              if not p.startswith(theirs)}
    problems = compare_manifests(expected, actual)
    own_splits = [s for s in meta.get("splits", {}) if s not in added]
    problems += [f"missing: {p}" for p in _missing_lists(data_root, dataset_path, own_splits)]
    if not problems:
        return True
    print(f"{dataset_path}: repairing {len(problems)} problem(s), e.g. {problems[0]}", file=sys.stderr)
    for path in expected.keys() & actual.keys():
        if expected[path] != actual[path]:
            os.remove(os.path.join(dataset_path, path))
    return False


def remove_temp_files(folder: str):
    """Drop the temporary token files (atomic_io's `.<name>.npy.XXXXXXXX.tmp`) a killed run left in folder."""
    os.makedirs(folder, exist_ok=True)
    for leftover in glob.glob(os.path.join(glob.escape(folder), ".*.npy.*.tmp")):
        os.remove(leftover)


def added_splits(meta: dict) -> dict:
    """The splits that `add_split` added to a dataset: name -> {"stats": its `splits` entry, "book_sha256"}."""
    hashes = meta.get("book_sha256") or {}
    return {name: {"stats": stats, "book_sha256": hashes.get(name, {})}
            for name, stats in meta.get("splits", {}).items() if isinstance(stats, dict) and "added" in stats}


def _kept_added_splits(dataset_path: str, meta: dict) -> dict:
    """The added splits to keep through a (re)build: the finished meta's, else those a marker recorded."""
    if meta:
        return added_splits(meta)
    marker = os.path.join(dataset_path, MARKER)
    if not os.path.isfile(marker):
        return {}
    return _marker_record(marker).get("added_splits") or {}


def _start(dataset_path: str, fingerprint: str, added: dict):
    """Mark the folder as an unfinished preparation of this fingerprint (keeping the added splits' records
    for a resumed run); drop a killed run's temp files."""
    remove_temp_files(os.path.join(dataset_path, "files"))
    atomic_write_json(os.path.join(dataset_path, MARKER), {"fingerprint": fingerprint, "added_splits": added})
    meta_path = os.path.join(dataset_path, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the dataset is unfinished until meta.json is written again


def split_stats(splits: dict[str, list[BookRef]], results: dict) -> tuple[dict, dict]:
    """(split -> [(book, result)] of the usable books, split -> sizes)."""
    kept_by_split, stats = {}, {}
    for split, refs in splits.items():
        kept = [(r, results[r.book_id]) for r in refs if not results[r.book_id].skipped]
        if not kept:
            raise UserError(f"the {split} split has no usable books")
        kept_by_split[split] = kept
        stats[split] = {
            "books": len(kept), "tokens": sum(res.tokens for _, res in kept),
            "text_bytes": sum(res.text_bytes for _, res in kept), "chars": sum(res.chars for _, res in kept),
            "file_list": split_list_name(split),
        }
    return kept_by_split, stats


def check_token_files(refs: list[BookRef], dataset_path: str):
    """Before writing anything: every book's token file must lie inside the dataset and have a usable name."""
    for ref in refs:
        path_inside(dataset_path, ref.token_file, f"book '{ref.book_id}'")
        name = os.path.basename(ref.token_file)
        if len(os.fsencode(name)) > MAX_TOKEN_FILE_NAME:
            raise UserError(f"the name of book {ref.origin!r} is too long for its token file ({len(os.fsencode(name))} "
                            f"bytes in {name[:40]!r}...; at most {MAX_TOKEN_FILE_NAME}); rename the book")


def _prepare(refs: list[BookRef], description: dict, opts: PrepareOptions) -> dict:
    source_splits = all(r.split is not None for r in refs)
    if opts.max_books and not source_splits:
        refs = choose_subset(refs, opts.max_books)
    splits = assign_splits(refs, opts.test_fraction, opts.split_by)
    vocab, given_model = _resolve_vocab(opts)
    tokenizer_sha = hashlib.sha256(given_model).hexdigest() if given_model else None
    fingerprint = _fingerprint(description["kind"], splits, opts, vocab, tokenizer_sha)
    dataset_path = os.path.join(opts.out, f"{opts.name}_{vocab}")
    check_token_files(refs, dataset_path)
    with exclusive_lock(opts.out, "corpus folder"):
        meta = _check_resumable(dataset_path, fingerprint)
        if meta and _repair_or_finish(opts.out, dataset_path, meta):
            print(f"{dataset_path} is already prepared (meta.json, token files and file lists match)")
            print_summary(meta)
            return meta
        added = _kept_added_splits(dataset_path, meta)
        _start(dataset_path, fingerprint, added)
        built = _build(splits, dataset_path, opts, vocab, given_model)
        meta = _finish(dataset_path, fingerprint, {
            "format": FORMAT, "dataset": os.path.basename(dataset_path), "vocab_size": vocab,
            "source": {**description, "books": len(refs)}, "tokenizer": built["tokenizer"],
            "split_by": "source" if source_splits else opts.split_by,
            "test_fraction": None if source_splits else opts.test_fraction,
            "splits": {**built["splits"], **{name: a["stats"] for name, a in added.items()}},
            "book_sha256": {**built["book_sha256"], **{name: a["book_sha256"] for name, a in added.items()}},
            "skipped": built["skipped"], **({"duplicates": built["duplicates"]} if built["duplicates"] else {})})
    print_summary(meta)
    return meta


def _build(splits: dict[str, list[BookRef]], dataset_path: str, opts: PrepareOptions, vocab: int,
           given_model: bytes | None) -> dict:
    """Tokenizer, token files, file lists and counts; return the meta.json fields describing them."""
    bad = BadBooks(opts.strict)
    model_path = os.path.join(dataset_path, "tokenizer.model")
    if given_model is not None:
        if not os.path.isfile(model_path) or model_file_bytes(model_path) != given_model:
            atomic_write_bytes(model_path, given_model)
    elif not os.path.isfile(model_path):
        print(f"training the tokenizer (vocab {vocab}) on {len(splits['train'])} train books", file=sys.stderr)
        books = tqdm(splits["train"], desc="tokenizer input", unit="book", disable=not opts.progress)
        atomic_write_bytes(model_path, train_tokenizer(bad.texts(books), vocab, opts.workers))

    results = {}
    all_refs = [r for split_refs in splits.values() for r in split_refs]
    for result in tokenise_books(all_refs, dataset_path, model_path, vocab, opts.workers, opts.progress):
        if result.skipped:
            bad(result.book_id, result.skipped)
        results[result.book_id] = result
    splits, duplicates = drop_held_out_duplicates(splits, results, dataset_path)
    kept_by_split, stats = split_stats(splits, results)
    write_lists(opts.out, dataset_path, kept_by_split)
    return {
        "tokenizer": {"file": "tokenizer.model", "sha256": hashlib.sha256(model_file_bytes(model_path)).hexdigest(),
                      "trained_on": "given" if given_model else "train split", "settings": SETTINGS},
        "splits": stats,
        "book_sha256": book_hashes(kept_by_split),
        "skipped": bad.skipped,
        "duplicates": duplicates,
    }


def _examples(found: list, home: dict) -> str:
    """Up to 3 of the held-out duplicates, as `split 'id' = split 'id'`."""
    shown = ", ".join(f"{split} '{ref.book_id}' = {home[id(other)]} '{other.book_id}'"
                      for split, ref, other in found[:3])
    return shown + (", ..." if len(found) > 3 else "")


def drop_held_out_duplicates(splits: dict[str, list[BookRef]], results: dict,
                             dataset_path: str) -> tuple[dict[str, list[BookRef]], dict]:
    """(the splits without the held-out books whose content is a train book's or repeats one of their split,
    book id -> {"split", "same_as", "same_as_split"} of the dropped books); their token files are deleted.

    Only usable books are compared (their content hash comes from tokenising). Books with a file-list row
    of their own (books3 `--split-lists`) are kept: the original lists are reproduced unchanged.
    """
    usable = {split: [r for r in refs if not results[r.book_id].skipped] for split, refs in splits.items()}
    found = held_out_duplicates(usable, lambda r: results[r.book_id].sha256)
    home = {id(r): split for split, refs in splits.items() for r in refs}
    fixed = [f for f in found if f[1].list_count is not None]
    found = [f for f in found if f[1].list_count is None]
    if fixed:
        print(f"warning: {len(fixed)} held-out book(s) of the given split lists have the same text as a train "
              f"book or an earlier book of their split ({_examples(fixed, home)}); kept, as the lists are "
              f"reproduced unchanged", file=sys.stderr)
    if not found:
        return splits, {}
    print(f"warning: dropped {len(found)} held-out book(s) with the same text as a train book or as an earlier "
          f"book of their split ({_examples(found, home)}): testing on trained-on text measures memorisation; "
          f"train is unchanged, the dropped books are listed in meta.json under `duplicates`", file=sys.stderr)
    dropped = {id(ref) for _, ref, _ in found}
    kept = {split: [r for r in refs if id(r) not in dropped] for split, refs in splits.items()}
    for split in dict.fromkeys(split for split, _, _ in found):
        if not any(not results[r.book_id].skipped for r in kept[split]):
            raise UserError(f"the {split} split has no books left: each of its usable books has the same text as a "
                            f"train book or another of its books; add books with other texts")
    in_use = {r.token_file for refs in kept.values() for r in refs}
    for _, ref, _ in found:
        path = os.path.join(dataset_path, ref.token_file)
        if ref.token_file not in in_use and os.path.isfile(path):
            os.remove(path)
    return kept, {ref.book_id: {"split": split, "same_as": other.book_id, "same_as_split": home[id(other)]}
                  for split, ref, other in found}


def book_hashes(kept_by_split: dict) -> dict:
    """split -> token file -> content hash (SHA-256 of the cleaned text) of the split's usable books."""
    return {split: {ref.token_file: res.sha256 for ref, res in kept} for split, kept in kept_by_split.items()}


def _finish(dataset_path: str, fingerprint: str, meta: dict) -> dict:
    """Record the token files' manifest and write meta.json last: from now on the dataset is finished."""
    sizes = file_sizes(os.path.join(dataset_path, "files"), dataset_path)
    meta = {
        **meta,
        "integrity_sha256": integrity_hash(sizes),
        "files": sizes,
        "fingerprint": fingerprint,
        "languini_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(os.path.join(dataset_path, "meta.json"), meta)
    os.remove(os.path.join(dataset_path, MARKER))
    return meta


def write_lists(data_root: str, dataset_path: str, rows_by_split: dict, fix: str = "choose another --out"):
    """File lists and this dataset's per-split token counts.

    The lists belong to the corpus, shared by all its vocabularies: an existing list with the same books
    is kept (its counts are the first dataset's); one with other books is an error (`fix` says what to do).
    """
    missing = {}
    for split, kept in rows_by_split.items():
        rows = [(ref.token_file, res.tokens if ref.list_count is None else ref.list_count) for ref, res in kept]
        if not os.path.isfile(os.path.join(data_root, split_list_name(split))):
            missing[split] = rows
        elif [path for path, _ in read_file_list(data_root, split)] != [path for path, _ in rows]:
            raise UserError(f"{data_root} already has a different {split_list_name(split)} (another corpus?); "
                            f"{fix}")
    for split, rows in missing.items():
        write_file_list(data_root, split, rows)
    for split, kept in rows_by_split.items():
        write_split_counts(dataset_path, split, [res.tokens for _, res in kept])


def print_summary(meta: dict):
    """The size of every split: books, tokens and text megabytes."""
    print(f"dataset {meta['dataset']} (vocab {meta['vocab_size']}, integrity {meta['integrity_sha256'][:16]}...)")
    print(f"  {'split':<12}{'books':>8}{'tokens':>15}{'text MB':>10}")
    for split, s in meta["splits"].items():
        print(f"  {split:<12}{s['books']:>8,}{s['tokens']:>15,}{s['text_bytes'] / 1e6:>10.2f}")
    if meta.get("skipped"):
        print(f"  skipped {len(meta['skipped'])} unusable book(s), listed in meta.json")
    if meta.get("duplicates"):
        print(f"  dropped {len(meta['duplicates'])} held-out book(s) repeating a train book's text, listed in meta.json")
