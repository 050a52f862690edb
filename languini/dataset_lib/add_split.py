"""`languini data add-split`: tokenise more held-out books into a named evaluation split of a prepared dataset.

The books (a folder or archive of `.txt` books, JSON-lines or Parquet files) are cleaned like `prepare`
cleans them and tokenised with the dataset's own `tokenizer.model` (never retrained) into
`<dataset>/files/<name>/`, listed in `<corpus>/file_list_test_<name>.npy` (the split `<name>`) with this
dataset's counts in `split_counts/`, and registered in meta.json (`splits`, `book_sha256`, `files`,
`integrity_sha256`), so `data info`, `data verify`, the integrity hash, `read_split_tokens` and the stream
loader all see it.

No book of the new split may be a train book: with the train books' content hashes in meta.json (datasets
prepared since they are recorded) each new book's hash is compared before anything is tokenised; for
older datasets the new books' token arrays are compared with the train books of the same length, which is
exact (the tokenizer is lossless) and reads only those few train books.

Like `prepare`: the corpus folder is locked, token files are written atomically, a marker file
(`.add-split-<name>.json`) ties an unfinished split to its books so a re-run finishes it, meta.json is
written last, and re-running a finished command is a no-op (repairing missing or resized token files).
"""

import contextlib
import dataclasses
import datetime
import glob
import hashlib
import json
import os
import shutil
import sys

import numpy as np
from tqdm import tqdm

from languini import __version__
from languini.common_lib.atomic_io import atomic_write_json
from languini.common_lib.errors import UserError
from languini.common_lib.file_lock import exclusive_lock
from languini.dataset_lib.integrity_test import file_sizes, integrity_hash
from languini.dataset_lib.layout import (
    SPLIT_ALIASES,
    add_split_marker,
    check_safe_name,
    data_root_of,
    open_token_file,
    read_books,
    read_file_list,
    read_meta,
    sha256_file,
    split_counts_path,
    split_list_name,
)
from languini.dataset_lib.prepare import (
    FORMAT,
    BadBooks,
    check_token_files,
    os_error_message,
    print_summary,
    remove_temp_files,
    split_stats,
    write_lists,
)
from languini.dataset_lib.sources import BadBook, BookRef, folder, load_text, records
from languini.dataset_lib.tokenise_books import tokenise_books
from languini.dataset_lib.tokenizer_model import load_processor
from languini.dataset_lib.verify import compare_manifests

# `all` means every split to eval.py; the others name (or alias) the splits prepare makes.
RESERVED_NAMES = tuple(dict.fromkeys(("train", "test", "iid", "all", *SPLIT_ALIASES)))


@dataclasses.dataclass
class AddSplitOptions:
    dataset: str  # the prepared dataset folder, e.g. data/demo/demo_4096
    name: str  # the new split: <corpus>/file_list_test_<name>.npy
    workers: int = 1
    strict: bool = False
    progress: bool = True


def check_split_name(name: str):
    """A new split's name must be a safe identifier and not one of the names prepare's splits use."""
    check_safe_name(name, "split name")
    if name in RESERVED_NAMES:
        raise UserError(f"split name '{name}' is reserved ({', '.join(RESERVED_NAMES)}); choose another --name")


def _source_kind(path: str) -> str:
    """`txt` (a folder or archive of .txt books), `jsonl` or `parquet`, from the path or the folder's files."""
    if os.path.isdir(path):
        found = {
            kind for kind, suffixes in (("txt", (".txt",)), ("jsonl", records.JSONL_SUFFIXES),
                                        ("parquet", records.PARQUET_SUFFIXES))
            if any(glob.glob(os.path.join(glob.escape(path), "**", f"*{s}"), recursive=True) for s in suffixes)
        }  # fmt: skip
        if len(found) != 1:
            detail = f"mixes {' and '.join(sorted(found))} files" if found else "holds no .txt, .jsonl, .jsonl.gz or .parquet files"
            raise UserError(f"{path} {detail}; give a folder of one kind")
        return found.pop()
    kind = records.kind_of(path) or ("txt" if path.endswith(folder.ARCHIVE_SUFFIXES) else None)
    if not os.path.exists(path):
        raise UserError(f"no such folder or file: {path}")
    if kind is None:
        raise UserError(f"{path} is not a folder, a {'/'.join(folder.ARCHIVE_SUFFIXES)} archive of .txt books, "
                        f"a .jsonl/.jsonl.gz file or a .parquet file")
    return kind


@contextlib.contextmanager
def open_source(path: str, progress: bool = True):
    """Yield (books, description) of SOURCE, whichever of the three kinds it is."""
    kind = _source_kind(path)
    if kind == "txt":
        with folder.open_books(path) as opened:
            yield opened
    else:
        with records.open_books(path, kind, progress) as opened:
            yield opened


def _finished_meta(dataset_path: str) -> dict:
    if not os.path.isdir(dataset_path):
        raise UserError(f"no dataset folder at {dataset_path}; prepare it first with `languini data prepare`")
    meta = read_meta(dataset_path)
    if not meta:
        raise UserError(f"{dataset_path} has no meta.json (not a finished `languini data prepare` dataset); "
                        f"finish or re-run its preparation first")
    if not os.path.isfile(os.path.join(dataset_path, "tokenizer.model")):
        raise UserError(f"{dataset_path} has no tokenizer.model to tokenise the new books with")
    return meta


def _fingerprint(refs: list[BookRef], description: dict, name: str, tokenizer_sha: str) -> str:
    settings = {"format": FORMAT, "kind": description["kind"], "name": name, "tokenizer": tokenizer_sha,
                "listing": [[r.book_id, r.size, r.token_file] for r in refs]}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _check_tokenizer(dataset_path: str, meta: dict) -> str:
    """The SHA-256 of the dataset's tokenizer.model, which must still be the one its token files were made with."""
    model = os.path.join(dataset_path, "tokenizer.model")
    digest = sha256_file(model)
    recorded = (meta.get("tokenizer") or {}).get("sha256")
    if recorded and recorded != digest:
        raise UserError(f"{model} is not the tokenizer this dataset was prepared with (SHA-256 {digest[:12]}..., "
                        f"meta.json says {recorded[:12]}...); restore it")
    size = load_processor(model).get_piece_size()
    if size != meta.get("vocab_size"):
        raise UserError(f"{model} has {size} pieces but meta.json says vocab_size {meta.get('vocab_size')}")
    return digest


def _registered_problems(dataset_path: str, name: str, meta: dict) -> list[str]:
    """Missing or resized token files and missing lists of an added split (resized files are deleted)."""
    prefix = f"files/{name}/"
    expected = {p: n for p, n in meta.get("files", {}).items() if p.startswith(prefix)}
    actual = file_sizes(os.path.join(dataset_path, "files", name), dataset_path)
    problems = compare_manifests(expected, actual)
    lists = [os.path.join(data_root_of(dataset_path), split_list_name(name)), split_counts_path(dataset_path, name)]
    problems += [f"missing: {p}" for p in lists if not os.path.isfile(p)]
    for path in expected.keys() & actual.keys():
        if expected[path] != actual[path]:
            os.remove(os.path.join(dataset_path, path))
    return problems


def _check_free(dataset_path: str, name: str, refs: list[BookRef]):
    """A split not registered in this dataset: its file list (another vocabulary of the corpus may have added
    the same books) and token folder must not hold other books."""
    data_root = data_root_of(dataset_path)
    if os.path.isfile(os.path.join(data_root, split_list_name(name))):
        ours = {r.token_file for r in refs}
        if not {rel for rel, _ in read_file_list(data_root, name)} <= ours:
            raise UserError(f"the corpus {data_root} already has a split '{name}' ({split_list_name(name)}) with "
                            f"other books; choose another --name")
    split_dir = os.path.join(dataset_path, "files", name)
    if os.path.exists(split_dir) and not os.path.isfile(add_split_marker(dataset_path, name)):
        raise UserError(f"{split_dir} already exists and is not an added split; choose another --name")


def _check_marker(dataset_path: str, name: str, fingerprint: str):
    marker = add_split_marker(dataset_path, name)
    if not os.path.isfile(marker):
        return
    try:
        with open(marker, encoding="utf-8") as f:
            recorded = json.load(f)
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict) or recorded.get("fingerprint") != fingerprint:
        split_dir = os.path.join(dataset_path, "files", name)
        raise UserError(f"{dataset_path} holds an unfinished split '{name}' of other books ({marker}); re-run with "
                        f"the same SOURCE to finish it, or delete {marker} and {split_dir} to start again")


def _overlap_error(found: list[tuple[BookRef, str]], source: str) -> UserError:
    ref, train_file = found[0]
    return UserError(f"{len(found)} book(s) of {source} are also in the train split, e.g. {ref.origin} "
                     f"(same content as the train book {train_file}); remove them from the source")


def _overlap_by_text(refs: list[BookRef], train_hashes: dict, progress: bool) -> list[tuple[BookRef, str]]:
    """New books whose cleaned text has the SHA-256 of a train book (from meta.json), before tokenising."""
    train_by_hash = {digest: token_file for token_file, digest in train_hashes.items()}
    found = []
    for ref in tqdm(refs, desc="comparing with the train books", unit="book", disable=not progress):
        try:
            text = load_text(ref)
        except BadBook:
            continue  # skipped (or refused with --strict) when tokenising
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if digest in train_by_hash:
            found.append((ref, train_by_hash[digest]))
    return found


def _token_digest(tokens) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int64).tobytes()).hexdigest()


def _overlap_by_tokens(dataset_path: str, kept: list, vocab_size: int, progress: bool) -> list[tuple[BookRef, str]]:
    """New books whose token array equals a train book's (datasets without train content hashes): only the
    train books of a length some new book has are read."""
    new_by_length: dict[int, list[BookRef]] = {}
    for ref, res in kept:
        new_by_length.setdefault(res.tokens, []).append(ref)
    candidates = [(rel, n) for rel, n in read_books(dataset_path, "train") if n in new_by_length]
    new_digests, found = {}, []
    for rel, n in tqdm(candidates, desc="comparing with the train books", unit="book", disable=not progress):
        train_digest = _token_digest(open_token_file(dataset_path, rel, n, vocab_size))
        for ref in new_by_length[n]:
            if ref.book_id not in new_digests:
                new_digests[ref.book_id] = _token_digest(open_token_file(dataset_path, ref.token_file, n, vocab_size))
            if new_digests[ref.book_id] == train_digest:
                found.append((ref, rel))
    return found


def add_split(refs: list[BookRef], description: dict, opts: AddSplitOptions) -> dict:
    """Add the books as split `opts.name` of the dataset `opts.dataset`; return the updated meta.json."""
    try:
        return _add_split(refs, description, opts)
    except OSError as e:
        raise os_error_message(e) from None


def _add_split(refs: list[BookRef], description: dict, opts: AddSplitOptions) -> dict:
    dataset_path, name = opts.dataset, opts.name
    check_split_name(name)
    _finished_meta(dataset_path)
    refs = [dataclasses.replace(r, split=name, rel_path=f"files/{name}/{os.path.basename(r.token_file)}")
            for r in refs]
    check_token_files(refs, dataset_path)
    data_root = data_root_of(dataset_path) or os.curdir  # `--dataset demo_4096` from inside the corpus folder
    with exclusive_lock(data_root, "corpus folder"):
        meta = _finished_meta(dataset_path)  # read again: another command may have changed it meanwhile
        fingerprint = _fingerprint(refs, description, name, _check_tokenizer(dataset_path, meta))
        registered = meta["splits"].get(name)
        if registered is not None:
            if not (isinstance(registered, dict) and (registered.get("added") or {}).get("fingerprint") == fingerprint):
                raise UserError(f"{dataset_path} already has a split '{name}'; choose another --name")
            problems = _registered_problems(dataset_path, name, meta)
            if not problems:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(add_split_marker(dataset_path, name))
                print(f"split '{name}' is already in {dataset_path} (same books; token files and file list match)")
                return meta
            print(f"{dataset_path}: repairing split '{name}' ({len(problems)} problem(s), e.g. {problems[0]})",
                  file=sys.stderr)
        else:
            _check_free(dataset_path, name, refs)
        _check_marker(dataset_path, name, fingerprint)

        train_hashes = (meta.get("book_sha256") or {}).get("train")
        if train_hashes:
            found = _overlap_by_text(refs, train_hashes, opts.progress)
            if found:
                raise _overlap_error(found, description.get("path", "the source"))
        split_dir = os.path.join(dataset_path, "files", name)
        remove_temp_files(split_dir)
        atomic_write_json(add_split_marker(dataset_path, name), {"fingerprint": fingerprint})
        kept_by_split, stats, skipped = _tokenise(refs, dataset_path, meta["vocab_size"], opts)
        if not train_hashes:
            found = _overlap_by_tokens(dataset_path, kept_by_split[name], meta["vocab_size"], opts.progress)
            if found:
                shutil.rmtree(split_dir, ignore_errors=True)  # nothing of the refused split is kept
                os.remove(add_split_marker(dataset_path, name))
                raise _overlap_error(found, description.get("path", "the source"))
        write_lists(data_root, dataset_path, kept_by_split, fix="choose another --name")
        meta = _register(dataset_path, meta, name, kept_by_split[name], stats[name], {
            "source": {**description, "books": len(refs)}, "fingerprint": fingerprint, "skipped": skipped})
        os.remove(add_split_marker(dataset_path, name))
    print_summary(meta)
    return meta


def _tokenise(refs: list[BookRef], dataset_path: str, vocab_size: int, opts: AddSplitOptions):
    bad = BadBooks(opts.strict)
    results = {}
    model_path = os.path.join(dataset_path, "tokenizer.model")
    for result in tokenise_books(refs, dataset_path, model_path, vocab_size, opts.workers, opts.progress):
        if result.skipped:
            bad(result.book_id, result.skipped)
        results[result.book_id] = result
    kept_by_split, stats = split_stats({opts.name: refs}, results)
    return kept_by_split, stats, bad.skipped


def _register(dataset_path: str, meta: dict, name: str, kept: list, stats: dict, added: dict) -> dict:
    """meta.json with the split, its books' content hashes and token files (written atomically, last)."""
    prefix = f"files/{name}/"
    files = {p: n for p, n in meta.get("files", {}).items() if not p.startswith(prefix)}
    files.update(file_sizes(os.path.join(dataset_path, "files", name), dataset_path))
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    earlier = (meta["splits"].get(name) or {}).get("added") or {}
    if earlier.get("fingerprint") == added["fingerprint"]:  # a repair: the split was added back then
        now = earlier.get("created", now)
    meta = {
        **meta,
        "splits": {**meta["splits"], name: {**stats, "added": {**added, "created": now, "languini_version": __version__}}},
        "book_sha256": {**(meta.get("book_sha256") or {}), name: {ref.token_file: res.sha256 for ref, res in kept}},
        "files": files,
        "integrity_sha256": integrity_hash(files),
    }
    atomic_write_json(os.path.join(dataset_path, "meta.json"), meta)
    return meta
