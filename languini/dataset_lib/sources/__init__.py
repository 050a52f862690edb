"""Corpus sources for `languini data prepare SOURCE`: each one turns its input into a list of `BookRef`s.

A `BookRef` says where a book's raw bytes are (a file, a slice of a file, or a member of a zip archive) and
how to clean them,
so that worker processes can load any book on their own. Sources with fixed splits (pg19, books3) set
`split`; the others leave it to `splits.assign_splits`.
"""

import dataclasses
import functools
import hashlib
import os
import re
import zipfile
from collections.abc import Callable

from languini.common_lib.errors import UserError


class BadBook(Exception):
    """A book that cannot be used (not UTF-8, ...): skipped with a warning, or fatal with --strict."""


@dataclasses.dataclass(frozen=True)
class BookRef:
    book_id: str  # unique; names the token file files/<book_id>.npy
    path: str  # file on disk (or the zip archive holding `member`)
    clean: Callable[[str], str]  # raw decoded text -> book text (module-level function, so it pickles)
    size: int  # raw bytes, part of the source fingerprint
    member: str | None = None
    split: str | None = None  # fixed by the source, else assigned by hashing the book id
    author: str | None = None  # for author-disjoint splits
    rel_path: str | None = None  # token file relative to the dataset folder (default files/<book_id>.npy)
    list_count: int | None = None  # token count to keep in the file list (books3: the original's)
    offset: int = 0  # with `length`: the book is bytes [offset, offset + length) of `path`
    length: int | None = None
    label: str | None = None  # where the book came from, for messages (default: path[:member])

    @property
    def token_file(self) -> str:
        return self.rel_path or f"files/{self.book_id}.npy"

    @property
    def origin(self) -> str:
        if self.label:
            return self.label
        return f"{self.path}:{self.member}" if self.member else self.path


@functools.lru_cache(maxsize=4)
def _open_zip(path: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(path)


def read_raw(ref: BookRef) -> bytes:
    if ref.member is not None:
        return _open_zip(ref.path).read(ref.member)
    with open(ref.path, "rb") as f:
        if ref.length is None:
            return f.read()
        f.seek(ref.offset)
        return f.read(ref.length)


def load_text(ref: BookRef) -> str:
    """The cleaned text of a book; raises BadBook when its bytes are not UTF-8."""
    raw = read_raw(ref)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadBook(f"{ref.origin} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    return ref.clean(text)


def cache_dir(*parts: str) -> str:
    """Download cache: $LANGUINI_CACHE, else ~/.cache/languini."""
    root = os.environ.get("LANGUINI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "languini")
    return os.path.join(root, *parts)


def check_unique_ids(refs: list[BookRef], where: str,
                     rule: str = "book ids are file names without extension and must be unique"):
    seen = {}
    for ref in refs:
        if ref.book_id in seen:
            raise UserError(f"two books in {where} share the id '{ref.book_id}' ({seen[ref.book_id]} and "
                            f"{ref.origin}); {rule}")
        seen[ref.book_id] = ref.origin


_SAFE_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def safe_stem(book_id: str) -> str:
    """A token file name (without `.npy`) for any book id: the id itself when it is a plain file name
    (letters, digits, `._-`, at most 100 characters), else its plain characters and a hash of the id."""
    if _SAFE_STEM.fullmatch(book_id) and not book_id.endswith("."):
        return book_id
    plain = re.sub(r"[^A-Za-z0-9._-]+", "_", book_id)[:60].strip("._-") or "book"
    return f"{plain}-{hashlib.sha256(book_id.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"
