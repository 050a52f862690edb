"""`languini data verify DIR`: check a dataset's files against meta.json and the content of every token file.

Two kinds of check, one line per problem:
- the manifest: every token file named in meta.json is there with its size, nothing else is (and the
  integrity hash matches); for original data without meta.json, the published hash;
- the content: a file list for every split in meta.json, each row inside the dataset folder, and each listed
  token file a readable .npy of the layout's dtype, as long as its row says, with ids below the vocabulary.
Splits added by `languini data add-split` are in meta.json like the others; an interrupted one is a problem.
"""

import os

from tqdm import tqdm

from languini.common_lib.errors import UserError
from languini.dataset_lib.integrity_test import KNOWN_HASHES, file_sizes, hashed_folder, integrity_hash
from languini.dataset_lib.layout import (
    data_root_of,
    list_splits,
    open_token_file,
    read_books,
    read_meta,
    split_list_name,
    unfinished_splits,
)


def compare_manifests(expected: dict[str, int], actual: dict[str, int]) -> list[str]:
    """One line per missing, extra or resized file (paths relative to the dataset folder)."""
    problems = [f"missing: {p}" for p in sorted(set(expected) - set(actual))]
    problems += [f"extra: {p}" for p in sorted(set(actual) - set(expected))]
    problems += [f"resized: {p} ({expected[p]} -> {actual[p]} bytes)"
                 for p in sorted(set(expected) & set(actual)) if expected[p] != actual[p]]
    return problems


def _listed_books(dataset_path: str, splits: list[str]) -> tuple[list[tuple[str, int]], list[str]]:
    """(rows of every split's file list, one problem per split whose list is missing or unreadable)."""
    data_root = data_root_of(dataset_path)
    rows, problems = [], []
    for split in splits:
        if not os.path.isfile(os.path.join(data_root, split_list_name(split))):
            problems.append(f"missing file list: {os.path.join(data_root, split_list_name(split))} (split {split})")
            continue
        try:
            rows += read_books(dataset_path, split)
        except UserError as e:
            problems.append(f"bad file list: {e}")
    return rows, problems


def check_contents(dataset_path: str, splits: list[str], vocab_size: int | None, already: set[str] = frozenset(),
                   progress: bool = True) -> list[str]:
    """One line per problem with the splits' file lists and their token files (see `layout.open_token_file`).

    Files named in `already` (reported missing or resized by the manifest check) are not reported twice.
    """
    rows, problems = _listed_books(dataset_path, splits)
    for rel, count in tqdm(rows, desc="checking token files", unit="file", disable=not progress):
        if rel in already:
            continue
        try:
            open_token_file(dataset_path, rel, count, vocab_size, exact_dtype=True)
        except UserError as e:
            problems.append(f"bad token file: {e}")
    return problems


def not_a_dataset(path: str, why: str) -> UserError:
    """The error for a path that is no dataset folder; a corpus folder (e.g. data/demo) names its datasets."""
    if not os.path.isdir(path):
        return UserError(f"no such folder: {path}")
    folders = sorted(os.listdir(path))
    datasets = [os.path.join(path, d) for d in folders if os.path.isfile(os.path.join(path, d, "meta.json"))]
    hint = f"; it is a corpus folder: pass its dataset folder, {' or '.join(datasets)}" if datasets else ""
    return UserError(f"{path} {why}{hint}")


def verify_dataset(path: str, progress: bool = False) -> tuple[str, list[str]]:
    """(integrity hash now, problems); an empty problem list means the data is intact."""
    folder = hashed_folder(path)
    actual = file_sizes(folder, base=path)
    digest = integrity_hash(actual)
    meta = read_meta(path)
    if not meta:
        known = KNOWN_HASHES.get(os.path.basename(os.path.normpath(path)))
        if known is None:
            raise not_a_dataset(path, f"has no meta.json to compare with (its integrity hash is {digest})")
        problems = [] if digest == known else [f"hash {digest} differs from the published {known}"]
        splits = list_splits(data_root_of(path))  # whatever lists the original data came with
        return digest, problems + check_contents(path, splits, None, progress=progress)
    expected = meta.get("files", {})
    problems = compare_manifests(expected, actual)
    if not problems and digest != meta.get("integrity_sha256"):
        problems.append(f"hash {digest} differs from meta.json's {meta.get('integrity_sha256')}")
    flagged = {p for p in expected if actual.get(p) != expected[p]}
    problems += check_contents(path, list(meta.get("splits", {})), meta.get("vocab_size"), flagged, progress)
    problems += [f"unfinished: the add-split of split '{name}' was interrupted; re-run the same "
                 f"`languini data add-split` command to finish it" for name in unfinished_splits(path)]
    return digest, problems
