"""The on-disk layout of a tokenised corpus (docs/data.md), compatible with the original Languini Books.

    <data_root>/file_list_train.npy          2 columns (str): token file relative to the dataset, count
    <data_root>/file_list_test_iid.npy       split `test`
    <data_root>/file_list_test_<name>.npy    split `<name>`
    <data_root>/<dataset>/files/*.npy        one 1-D uint16 (uint32 when V >= 65535) array per book
    <data_root>/<dataset>/files/<name>/*.npy  the token files of a split added by `languini data add-split`
    <data_root>/<dataset>/tokenizer.model, meta.json
"""

import glob
import hashlib
import json
import os
import posixpath
import re

import numpy as np

from languini.common_lib.atomic_io import atomic_save_npy
from languini.common_lib.errors import UserError
from languini.common_lib.suggest import did_you_mean

END_OF_DOC = 2  # `<D>`, inserted between books
PAD = 0

# The original's short split names stay valid.
SPLIT_ALIASES = {"test": "iid", "stats": "statistics", "wood": "woodworking"}
# A name that becomes part of a file or folder name (a split, a corpus): no separator, `..` or odd character.
SAFE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


def is_safe_name(name) -> bool:
    """True for a letter, then letters, digits or `_` (at most 64 characters)."""
    return isinstance(name, str) and SAFE_NAME.fullmatch(name) is not None


def check_safe_name(name, what: str):
    """Refuse a name (from a flag, a config or a shared bundle) that could lead a file path elsewhere."""
    if not is_safe_name(name):
        raise UserError(f"{what} {name!r} is not a safe identifier: use a letter, then letters, digits or _ "
                        f"(at most 64 characters)")


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 65535 else np.uint32


def split_list_name(split: str) -> str:
    """`train` -> file_list_train.npy, `test` -> file_list_test_iid.npy, `x` -> file_list_test_x.npy.

    Refuses a split name that is not a safe identifier: the file name must stay in its folder."""
    check_safe_name(split, "split name")
    if split == "train":
        return "file_list_train.npy"
    return f"file_list_test_{SPLIT_ALIASES.get(split, split)}.npy"


def list_splits(data_root: str) -> list[str]:
    """Split names present under data_root: `train`, `test` (iid), then the others by name.

    A file list whose name is not a safe identifier (`file_list_test_a b.npy`) names no split."""
    names = []
    for path in sorted(glob.glob(os.path.join(data_root, "file_list_*.npy"))):
        stem = os.path.basename(path)[len("file_list_") : -len(".npy")]
        rest = stem[len("test_") :] if stem.startswith("test_") else None
        if stem == "train":
            names.append("train")
        elif is_safe_name(rest):
            names.append("test" if rest == "iid" else rest)
    return sorted(names, key=lambda n: (n != "train", n != "test", n))


def test_splits(data_root: str) -> list[str]:
    return [s for s in list_splits(data_root) if s != "train"]


def data_root_of(dataset_path: str) -> str:
    """The corpus folder (holding the file lists) of a dataset folder such as data/demo/demo_4096."""
    return os.path.dirname(os.path.normpath(dataset_path))


def _reason(e: BaseException) -> str:
    """The first line of an exception's message (the whole error must stay one line)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _escapes(rel: str) -> bool:
    """True when a relative path from a file list or listing is empty, absolute or climbs out with `..`."""
    return (not rel or "\0" in rel or rel.startswith("/") or ".." in rel.split("/")
            or posixpath.normpath(rel) == ".")


def check_relative(rel: str, where: str):
    """Refuse a path (read from data: a file list row, a listing) that could name a file outside its folder."""
    if _escapes(rel):
        raise UserError(f"{where}: {rel!r} points outside the dataset folder (absolute or '..'); refusing it")


def path_inside(folder: str, rel: str, where: str) -> str:
    """`folder/rel`, refused when rel is absolute, climbs out with `..`, or leads out through a symlink.

    Symlinks *to* the folder (e.g. `data -> /big/disk/data`) are fine; only the part below it is checked.
    """
    root = os.path.realpath(folder)
    real = os.path.realpath(os.path.join(root, rel)) if not _escapes(rel) else ""
    if not real or real == root or os.path.commonpath([root, real]) != root:
        raise UserError(f"{where}: {rel!r} points outside {folder}; refusing it")
    return os.path.join(folder, rel)


def _load_npy(path: str, what: str) -> np.ndarray:
    """A small .npy array (file list, split counts), or one line saying why it cannot be read."""
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{what} {path} is damaged or unreadable ({_reason(e)})") from None


def read_file_list(data_root: str, split: str) -> list[tuple[str, int]]:
    """Rows (relative token-file path, token count) of a split, in data order; every row is checked."""
    path = os.path.join(data_root, split_list_name(split))
    if not os.path.isfile(path):
        present = list_splits(data_root) if os.path.isdir(data_root) else []
        hint = f"; present: {', '.join(present)}{did_you_mean(split, present)}" if present else ""
        raise UserError(f"split '{split}' not found: no {path}{hint}")
    arr = _load_npy(path, "file list")
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise UserError(f"{path} is not a 2-column file list (shape {arr.shape})")
    rows = []
    for i, (rel, count) in enumerate(arr):
        check_relative(str(rel), f"{path} row {i}")
        try:
            rows.append((str(rel), int(count)))
        except ValueError:
            raise UserError(f"{path} row {i}: token count {str(count)!r} is not a whole number") from None
        if rows[-1][1] < 0:
            raise UserError(f"{path} row {i}: negative token count {rows[-1][1]}")
    return rows


def write_file_list(data_root: str, split: str, rows):
    """Write a split list atomically as a 2-column string array (the original's format)."""
    arr = np.array([[str(p), str(int(n))] for p, n in rows], dtype=str).reshape(-1, 2)
    atomic_save_npy(os.path.join(data_root, split_list_name(split)), arr)


def write_token_file(path: str, tokens, vocab_size: int):
    atomic_save_npy(path, np.asarray(tokens).astype(token_dtype(vocab_size)))


def split_counts_path(dataset_path: str, split: str) -> str:
    """Per-dataset token counts of a split's books (a corpus may be tokenised with several vocabularies)."""
    return os.path.join(dataset_path, "split_counts", split_list_name(split))


def write_split_counts(dataset_path: str, split: str, counts):
    atomic_save_npy(split_counts_path(dataset_path, split), np.asarray(counts, dtype=np.int64))


def read_books(dataset_path: str, split: str) -> list[tuple[str, int]]:
    """Rows (token file relative to dataset_path, token count in *this* dataset) of a split.

    Counts come from <dataset>/split_counts/ when present (written by `languini data prepare`), else from
    the file list itself (original Languini Books data, whose list counts are books_16384's).
    """
    rows = read_file_list(data_root_of(dataset_path), split)
    counts_path = split_counts_path(dataset_path, split)
    if os.path.isfile(counts_path):
        counts = _load_npy(counts_path, "token counts")
        if counts.ndim != 1 or counts.dtype.kind not in "ui":
            raise UserError(f"token counts {counts_path} are not a 1-D integer array ({counts.dtype}, {counts.shape})")
        if len(counts) != len(rows):
            raise UserError(f"{counts_path} has {len(counts)} entries but the {split} list has {len(rows)}")
        rows = [(p, int(n)) for (p, _), n in zip(rows, counts)]
    return rows


# meta.json fields that code relies on, with their types.
_META_TYPES = {"dataset": str, "vocab_size": int, "splits": dict, "files": dict, "fingerprint": str,
               "integrity_sha256": str}


def read_meta(dataset_path: str) -> dict:
    """meta.json of a dataset folder, or {} when absent (e.g. original data linked in).

    A meta.json that is not JSON, or whose key fields have the wrong type, is refused in one line.
    """
    path = os.path.join(dataset_path, "meta.json")
    if not os.path.isfile(path):
        return {}
    damaged = f"restore it, or remove {dataset_path} and prepare the data again"
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise UserError(f"{path} is damaged (not valid JSON: {_reason(e)}); {damaged}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is damaged (a JSON {type(meta).__name__}, not an object); {damaged}")
    wrong = [k for k, kind in _META_TYPES.items() if k in meta and not isinstance(meta[k], kind)]
    if wrong:
        raise UserError(f"{path} is damaged (field '{wrong[0]}' is not a {_META_TYPES[wrong[0]].__name__}); {damaged}")
    return meta


def dataset_vocab(dataset_path: str) -> int | None:
    """The vocabulary size recorded in meta.json, or None (original data without meta.json)."""
    return read_meta(dataset_path).get("vocab_size")


class BadTokenFile(UserError):
    """A token file that does not match its file list row: missing, damaged, wrong dtype, length or ids."""


def _expected_dtypes(vocab_size: int | None) -> tuple:
    return (np.dtype(token_dtype(vocab_size)),) if vocab_size else (np.dtype(np.uint16), np.dtype(np.uint32))


def _check_tokens(path: str, tokens: np.ndarray, expected: int, vocab_size: int | None, exact_dtype: bool):
    """Raise BadTokenFile unless `tokens` is a 1-D integer array of `expected` ids in 0..vocab_size-1."""
    if tokens.offset + tokens.nbytes != os.path.getsize(path):
        raise BadTokenFile(f"token file {path} is {os.path.getsize(path)} bytes but its header describes "
                           f"{tokens.offset + tokens.nbytes}")
    if tokens.dtype.kind not in "ui" or (exact_dtype and tokens.dtype not in _expected_dtypes(vocab_size)):
        wanted = " or ".join(str(d) for d in _expected_dtypes(vocab_size))
        raise BadTokenFile(f"token file {path} holds {tokens.dtype} values, expected {wanted}")
    if tokens.ndim != 1 or len(tokens) != expected:
        raise BadTokenFile(f"token file {path} holds {tokens.shape} tokens but the split list says {expected}")
    if len(tokens) and vocab_size is not None and int(tokens.max()) >= vocab_size:
        raise BadTokenFile(f"token file {path} holds id {int(tokens.max())}, outside the vocabulary of {vocab_size}")
    if len(tokens) and tokens.dtype.kind == "i" and int(tokens.min()) < 0:
        raise BadTokenFile(f"token file {path} holds the negative id {int(tokens.min())}")


def open_token_file(dataset_path: str, rel: str, expected: int, vocab_size: int | None = None,
                    exact_dtype: bool = False) -> np.ndarray:
    """Memory-map one book's token file after checking it against its file list row (cheap: one pass of max).

    Refused with one line naming the file: a path leading outside the dataset, a missing file, a bad npy
    header, a size that disagrees with the header, a non-integer dtype (with `exact_dtype`: not the
    layout's uint16/uint32), a length other than `expected`, ids >= vocab_size (when known).
    """
    path = path_inside(dataset_path, rel, "file list entry")
    if not os.path.isfile(path):
        raise BadTokenFile(f"token file {path} is missing")
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BadTokenFile(f"token file {path} is damaged (not a readable .npy array: {_reason(e)})") from None
    _check_tokens(path, tokens, expected, vocab_size, exact_dtype)
    return tokens


def add_split_marker(dataset_path: str, name: str) -> str:
    """The marker file of an unfinished `languini data add-split` of split `name` (removed when it finishes)."""
    return os.path.join(dataset_path, f".add-split-{name}.json")


def unfinished_splits(dataset_path: str) -> list[str]:
    """Names of the splits whose `add-split` was interrupted (their marker file is still there)."""
    markers = glob.glob(os.path.join(glob.escape(dataset_path), ".add-split-*.json"))
    return sorted(os.path.basename(m)[len(".add-split-") : -len(".json")] for m in markers)


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_stream(f) -> str:
    """SHA-256 of what is left to read in a binary file object, read in blocks of 1 MiB."""
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def corpus_identity(dataset_path: str) -> dict:
    """What a model trained or evaluated on, cheaply (no token file is read).

    `tokenizer_sha256`: SHA-256 of <dataset>/tokenizer.model, or None without one (original data).
    `file_lists_sha256`: SHA-256 over every split of the corpus, sorted by name, with its file list's rows
    (token file, count). Any change to a tokenizer or a file list (a book added, removed, reordered or
    recounted, a split added or removed) changes the identity; nothing else does.
    For a dataset with meta.json, "every split" means the splits `prepare` made (recorded in meta.json):
    an evaluation split added later by `languini data add-split` (to this dataset or to another vocabulary
    of the corpus) leaves the identity unchanged, so runs trained before it can be scored on it.
    """
    model = os.path.join(dataset_path, "tokenizer.model")
    data_root = data_root_of(dataset_path)
    splits = sorted(list_splits(data_root)) if os.path.isdir(data_root or os.curdir) else []
    if not splits:
        raise UserError(f"no file lists (file_list_*.npy) in {data_root}: not a corpus folder")
    recorded = read_meta(dataset_path).get("splits")
    if recorded:
        prepared = {name for name, stats in recorded.items() if not (isinstance(stats, dict) and "added" in stats)}
        splits = [s for s in splits if s in prepared]
    lists = [[split, [[rel, count] for rel, count in read_file_list(data_root, split)]] for split in splits]
    return {
        "tokenizer_sha256": sha256_file(model) if os.path.isfile(model) else None,
        "file_lists_sha256": hashlib.sha256(json.dumps(lists, ensure_ascii=True).encode()).hexdigest(),
    }


def check_dataset(data_root: str, dataset: str, vocab_size: int) -> str:
    """Return the dataset folder, or raise a UserError that says how to prepare the data."""
    path = os.path.join(data_root, dataset)
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(data_root, split_list_name("train"))):
        raise UserError(
            f"no tokenised data at {path}; prepare it first, e.g. `languini data prepare demo` "
            f"(then --data_root data/demo --dataset demo_4096 --vocab_size 4096), or link existing data there"
        )
    meta_vocab = read_meta(path).get("vocab_size")
    if meta_vocab is not None and int(meta_vocab) != vocab_size:
        raise UserError(
            f"dataset {path} was tokenised with vocab_size {meta_vocab} but the config has --vocab_size "
            f"{vocab_size}; pass --vocab_size {meta_vocab} or prepare the data with --vocab-size {vocab_size}"
        )
    return path
