"""A folder, or a .tar/.tar.gz/.tar.xz archive, of `.txt` books (e.g. Project Gutenberg downloads).

Book id = file name without `.txt`. Gutenberg licence headers/footers are stripped and newlines normalised.
Archives are unpacked (only their `.txt` members) into a temporary folder ($TMPDIR) for the run; a damaged or
truncated archive is refused whole (one line, nothing prepared), however far into it the damage is.
An optional MANIFEST.tsv with columns `file` and `author_key` enables author-disjoint splits.
"""

import bz2
import contextlib
import csv
import glob
import gzip
import lzma
import os
import tarfile
import tempfile
import zlib

from languini.common_lib.errors import UserError
from languini.dataset_lib.sources import BookRef, check_unique_ids
from languini.dataset_lib.sources.gutenberg import clean_gutenberg

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")


def corpus_name(path: str) -> str:
    """`../gutenberg-400.tar.xz` -> `gutenberg-400`; `books/` -> `books`; `web.jsonl.gz` -> `web`."""
    name = os.path.basename(os.path.normpath(path))
    for suffix in ARCHIVE_SUFFIXES + (".jsonl.gz", ".jsonl", ".parquet"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def book_id_of(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def find_manifest(path: str) -> str | None:
    """A manifest beside the input (`<name>.MANIFEST.tsv` or `MANIFEST.tsv`) or inside a folder input."""
    parent = os.path.dirname(os.path.abspath(os.path.normpath(path)))
    candidates = [os.path.join(parent, f"{corpus_name(path)}.MANIFEST.tsv"), os.path.join(parent, "MANIFEST.tsv")]
    if os.path.isdir(path):
        candidates.insert(0, os.path.join(path, "MANIFEST.tsv"))
    return next((c for c in candidates if os.path.isfile(c)), None)


def read_authors(manifest: str) -> dict[str, str]:
    """book id -> author_key from a tab-separated manifest with columns `file` and `author_key`."""
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or not {"file", "author_key"} <= set(rows[0]):
        raise UserError(f"{manifest} needs tab-separated columns 'file' and 'author_key'")
    return {book_id_of(r["file"]): r["author_key"] for r in rows}


# Compressed formats by their first bytes (the suffix may lie); anything else is read as a plain tar.
_COMPRESSIONS = ((b"\x1f\x8b", gzip.open), (b"\xfd7zXZ\x00", lzma.open), (b"BZh", bz2.open))
# What a damaged or truncated archive raises while being read (BadGzipFile and bz2's errors are OSErrors).
_DAMAGE = (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, OSError)


class _Recorder:
    """A read-only file that remembers the last bytes read from it: the block where tarfile stopped."""

    def __init__(self, stream):
        self.stream, self.last = stream, b""

    def read(self, size=-1) -> bytes:
        self.last = self.stream.read(size)
        return self.last

    def seek(self, offset, whence=0):
        return self.stream.seek(offset, whence)

    def tell(self):
        return self.stream.tell()


def _decompressed(archive: str):
    """The archive as an uncompressed tar stream (gzip, xz or bz2 recognised by their magic bytes)."""
    with open(archive, "rb") as f:
        head = f.read(8)
    opener = next((o for magic, o in _COMPRESSIONS if head.startswith(magic)), None)
    return opener(archive, "rb") if opener else open(archive, "rb")


def _txt_members(archive: str):
    """Yield (member name, bytes) of every .txt member, then check that the whole archive is intact.

    tarfile silently stops at a damaged header and never reads a compressed stream's checksum, so
    after the last member the block it stopped at must be an end-of-archive marker (zeros), and the
    compressed stream is read to its end, which checks its CRC / integrity check and its length.
    """
    try:
        with _decompressed(archive) as stream:
            recorder = _Recorder(stream)
            with tarfile.open(fileobj=recorder, mode="r:") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".txt"):
                        with tar.extractfile(member) as src:
                            yield member.name, src.read()
                if recorder.last != bytes(tarfile.BLOCKSIZE):
                    raise tarfile.ReadError(f"no end-of-archive marker after {len(tar.members)} members")
            while stream.read(1 << 20):
                pass
    except _DAMAGE as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"archive {archive} is damaged or truncated ({reason}); nothing was prepared") from None


def _unpack_txt_members(archive: str, folder: str) -> list[tuple[str, str]]:
    """Write the archive's .txt members into `folder`; return (member name, unpacked path) pairs.

    The whole archive is read and checked before the caller prepares anything from it.
    """
    pairs = []
    for name, data in _txt_members(archive):
        target = os.path.join(folder, f"{len(pairs):07d}.txt")  # never a name from the archive
        with open(target, "wb") as dst:
            dst.write(data)
        pairs.append((name, target))
    return pairs


@contextlib.contextmanager
def open_books(path: str, manifest: str | None = None):
    """Yield (books, description) of a folder or archive of .txt books."""
    if not os.path.exists(path):
        raise UserError(f"no such folder or archive: {path}")
    manifest = manifest or find_manifest(path)
    if manifest and not os.path.isfile(manifest):
        raise UserError(f"no such manifest: {manifest}")
    authors = read_authors(manifest) if manifest else {}
    with contextlib.ExitStack() as stack:
        if os.path.isdir(path):
            files = sorted(glob.glob(os.path.join(glob.escape(path), "**", "*.txt"), recursive=True))
            pairs = [(f, f) for f in files if os.path.isfile(f)]
        elif path.endswith(ARCHIVE_SUFFIXES):
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="languini-unpack-"))
            pairs = _unpack_txt_members(path, tmp)
        else:
            raise UserError(f"{path} is neither a folder nor a {'/'.join(ARCHIVE_SUFFIXES)} archive")
        if not pairs:
            raise UserError(f"no .txt books found in {path}")
        refs = [
            BookRef(book_id=book_id_of(name), path=file, clean=clean_gutenberg, size=os.path.getsize(file),
                    author=authors.get(book_id_of(name)))
            for name, file in pairs
        ]
        check_unique_ids(refs, path)
        description = {"kind": "folder", "path": os.path.abspath(path),
                       "manifest": os.path.abspath(manifest) if manifest else None,
                       "cleaning": "Gutenberg header/footer stripped, CRLF -> LF, outer whitespace stripped"}
        yield refs, description
