"""Languini Books from a local books3 tree plus the original split lists (`file_list_*.npy`).

Each list row names a token file (`files/<book>.npy`) and its token count in books_16384; the book is the
file `<book>.<ext>` anywhere under the tree (as the original tokeniser found it). Texts are read like the
original did (UTF-8, universal newlines, no other cleaning), so tokenising with the original
`books_16384.model` (`--tokenizer`) reproduces `data/books/books_16384` and its published integrity hash.
"""

import contextlib
import os

from languini.common_lib.errors import UserError
from languini.dataset_lib.layout import list_splits, read_file_list
from languini.dataset_lib.sources import BookRef
from languini.dataset_lib.sources.gutenberg import normalise_newlines


def index_tree(tree: str) -> dict[str, str]:
    """File name without extension -> path, for every file under the tree."""
    index = {}
    for folder, _, names in os.walk(tree):
        for name in sorted(names):
            index.setdefault(os.path.splitext(name)[0], os.path.join(folder, name))
    return index


@contextlib.contextmanager
def open_books(tree: str, split_lists: str):
    """Yield (books, description): the books of every split list, in list order, found in the tree."""
    if not os.path.isdir(tree):
        raise UserError(f"no books3 folder at {tree}")
    splits = list_splits(split_lists) if os.path.isdir(split_lists) else []
    if "train" not in splits:
        raise UserError(f"no file_list_train.npy in --split-lists {split_lists} (get the lists from Zenodo 8326484)")
    index = index_tree(tree)
    refs, missing = [], []
    for split in splits:
        for rel, count in read_file_list(split_lists, split):  # rows checked: relative, inside, counts
            book_id = os.path.splitext(os.path.basename(rel))[0]
            path = index.get(book_id)
            if path is None:
                missing.append(book_id)
                continue
            refs.append(BookRef(book_id=book_id, path=path, clean=normalise_newlines, size=os.path.getsize(path),
                                split=split, rel_path=rel, list_count=count))
    if missing:
        examples = ", ".join(repr(m) for m in missing[:3])
        raise UserError(f"{len(missing)} books of the split lists are not under {tree} (e.g. {examples})")
    description = {"kind": "books3", "path": os.path.abspath(tree), "split_lists": os.path.abspath(split_lists),
                   "cleaning": "universal newlines only (as the original tokeniser)"}
    yield refs, description
