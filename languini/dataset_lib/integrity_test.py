"""Integrity hash of a tokenised dataset, the same algorithm as the original Languini Kitchen.

SHA-256 over the lines "{size}\\t{file name}\\n" of every file under a folder, where the file name is the
base name (no folder), sorted by (name, size). The original's books_16384 folder holds only `files/`, so
for a dataset folder with a `files/` subfolder we hash that subfolder (our datasets also hold
tokenizer.model and meta.json); the published books_16384 hash then verifies both layouts.

    python3 languini/dataset_lib/integrity_test.py data/books/books_16384
"""

import hashlib
import os
import sys

from languini.common_lib.errors import OneLineArgumentParser, UserError, exit_on_user_error

KNOWN_HASHES = {"books_16384": "0957d626c108d0075c18a5a99fa766533a46b2fba833061fdce445c6066558f7"}


def file_sizes(folder: str, base: str | None = None) -> dict[str, int]:
    """Path relative to `base` (default: folder) -> size in bytes, for every file under folder.

    A broken symlink counts as no file (so `verify` reports it missing) instead of stopping the walk.
    """
    sizes = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            try:
                size = os.path.getsize(path)
            except FileNotFoundError:
                continue
            sizes[os.path.relpath(path, base or folder).replace(os.sep, "/")] = size
    return sizes


def integrity_hash(sizes: dict[str, int]) -> str:
    entries = sorted((path.rsplit("/", 1)[-1], size) for path, size in sizes.items())
    digest = hashlib.sha256()
    for name, size in entries:
        digest.update(f"{size}\t{name}\n".encode())
    return digest.hexdigest()


def hashed_folder(path: str, whole: bool = False) -> str:
    """The folder the hash covers: `path/files` for a dataset folder, else path itself."""
    if not os.path.isdir(path):
        raise UserError(f"no such folder: {path}")
    files = os.path.join(path, "files")
    return files if not whole and os.path.isdir(files) else path


@exit_on_user_error
def main(argv=None):
    parser = OneLineArgumentParser(
        prog="integrity_test.py", description="Print the integrity hash (SHA-256) of a tokenised dataset."
    )
    parser.add_argument("dir", help="dataset folder, e.g. data/books/books_16384")
    parser.add_argument("--all", action="store_true", help="hash every file under DIR, not just DIR/files")
    args = parser.parse_args(argv)
    print(integrity_hash(file_sizes(hashed_folder(args.dir, args.all))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
