"""Deterministic, disjoint train/test splits from a stable hash of each book's id (or author), and the
held-out books to drop because their content is a train book's (or repeats one of their own split)."""

import hashlib
from collections.abc import Callable
from typing import TypeVar

from languini.common_lib.errors import UserError
from languini.dataset_lib.sources import BookRef

T = TypeVar("T")


def stable_hash(key: str) -> float:
    """A number in [0, 1) that depends only on `key` (never on the run, the machine or PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def choose_subset(refs: list[BookRef], n: int) -> list[BookRef]:
    """A fixed subset of n books, chosen by a hash independent of the split's (so it keeps the test share)."""
    return sorted(refs, key=lambda r: stable_hash(f"subset/{r.book_id}"))[:n]


def _group_key(ref: BookRef, split_by: str) -> str:
    return ref.book_id if split_by == "book" else f"author:{ref.author}"


def assign_splits(refs: list[BookRef], test_fraction: float, split_by: str = "book") -> dict[str, list[BookRef]]:
    """split name -> books in data order.

    Books with a split fixed by their source keep it and their order. The others go to `test` when the
    hash of their group (book id, or author with split_by='author') is below test_fraction, else to
    `train`; at least one group goes to each. Within a split, books are ordered by the hash of their id,
    a deterministic shuffle.
    """
    fixed = [r for r in refs if r.split is not None]
    if fixed:
        splits: dict[str, list[BookRef]] = {}
        for ref in fixed:
            splits.setdefault(ref.split, []).append(ref)
        return splits
    if not 0 < test_fraction < 1:
        raise UserError(f"--test-fraction must be between 0 and 1 (got {test_fraction})")
    if split_by == "author":
        unknown = [r.book_id for r in refs if not r.author]
        if unknown:
            raise UserError(f"--split-by author needs an author_key for every book (from a MANIFEST.tsv); "
                            f"{len(unknown)} have none, e.g. '{unknown[0]}'")
    groups = sorted({_group_key(r, split_by) for r in refs}, key=stable_hash)
    if len(groups) < 2:
        raise UserError(f"need at least 2 books (2 authors with --split-by author) to make a train and a test "
                        f"split; got {len(groups)}")
    test_groups = {g for g in groups if stable_hash(g) < test_fraction} or {groups[0]}
    if len(test_groups) == len(groups):
        test_groups.discard(groups[-1])
    order = sorted(refs, key=lambda r: stable_hash(r.book_id))
    return {
        "train": [r for r in order if _group_key(r, split_by) not in test_groups],
        "test": [r for r in order if _group_key(r, split_by) in test_groups],
    }


def held_out_duplicates(splits: dict[str, list[T]], content_hash: Callable[[T], str],
                        train: str = "train") -> list[tuple[str, T, T]]:
    """The held-out books whose content is already in the data: (split, book, the book it repeats).

    A book of a split other than `train` repeats a train book with the same content hash, or else an
    earlier book (in data order) of its own split; the first copy of a held-out book is kept, and train
    books are never returned (the train split stays as assigned). The hash splits by id, so the same text
    under two ids (a re-issue, a copied file) could otherwise be trained on and then tested. Deterministic:
    it follows the splits' order. Books of different held-out splits are not compared with each other.
    """
    in_train: dict[str, T] = {}
    for book in splits.get(train, []):
        in_train.setdefault(content_hash(book), book)
    found = []
    for split, books in splits.items():
        if split == train:
            continue
        seen = dict(in_train)
        for book in books:
            first = seen.setdefault(content_hash(book), book)
            if first is not book:
                found.append((split, book, first))
    return found
