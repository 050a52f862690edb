"""The on-disk layout of a tokenised corpus (DESIGN §3), compatible with the original Languini Books.

    <data_root>/file_list_train.npy          2 columns (str): token file relative to the dataset, count
    <data_root>/file_list_test_iid.npy       split `test`
    <data_root>/file_list_test_<name>.npy    split `<name>`
    <data_root>/<dataset>/files/*.npy        one 1-D uint16 (uint32 when V >= 65535) array per book
    <data_root>/<dataset>/tokenizer.model, meta.json
"""

import glob
import json
import os

import numpy as np

from languini.common_lib.atomic_io import atomic_save_npy
from languini.common_lib.errors import UserError
from languini.common_lib.suggest import did_you_mean

END_OF_DOC = 2  # `<D>`, inserted between books
PAD = 0

# The original's short split names stay valid.
SPLIT_ALIASES = {"test": "iid", "stats": "statistics", "wood": "woodworking"}


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 65535 else np.uint32


def split_list_name(split: str) -> str:
    """`train` -> file_list_train.npy, `test` -> file_list_test_iid.npy, `x` -> file_list_test_x.npy."""
    if split == "train":
        return "file_list_train.npy"
    return f"file_list_test_{SPLIT_ALIASES.get(split, split)}.npy"


def list_splits(data_root: str) -> list[str]:
    """Split names present under data_root: `train`, `test` (iid), then the others by name."""
    names = []
    for path in sorted(glob.glob(os.path.join(data_root, "file_list_*.npy"))):
        stem = os.path.basename(path)[len("file_list_") : -len(".npy")]
        if stem == "train":
            names.append("train")
        elif stem.startswith("test_"):
            rest = stem[len("test_") :]
            names.append("test" if rest == "iid" else rest)
    return sorted(names, key=lambda n: (n != "train", n != "test", n))


def test_splits(data_root: str) -> list[str]:
    return [s for s in list_splits(data_root) if s != "train"]


def data_root_of(dataset_path: str) -> str:
    """The corpus folder (holding the file lists) of a dataset folder such as data/demo/demo_4096."""
    return os.path.dirname(os.path.normpath(dataset_path))


def read_file_list(data_root: str, split: str) -> list[tuple[str, int]]:
    """Rows (relative token-file path, token count) of a split, in data order."""
    path = os.path.join(data_root, split_list_name(split))
    if not os.path.isfile(path):
        present = list_splits(data_root) if os.path.isdir(data_root) else []
        hint = f"; present: {', '.join(present)}{did_you_mean(split, present)}" if present else ""
        raise UserError(f"split '{split}' not found: no {path}{hint}")
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise UserError(f"{path} is not a 2-column file list (shape {arr.shape})")
    return [(str(p), int(n)) for p, n in arr]


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
        counts = np.load(counts_path)
        if len(counts) != len(rows):
            raise UserError(f"{counts_path} has {len(counts)} entries but the {split} list has {len(rows)}")
        rows = [(p, int(n)) for (p, _), n in zip(rows, counts)]
    return rows


def read_meta(dataset_path: str) -> dict:
    """meta.json of a dataset folder, or {} when absent (e.g. original data linked in)."""
    path = os.path.join(dataset_path, "meta.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


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
