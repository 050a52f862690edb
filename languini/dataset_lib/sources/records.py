"""Books as records: JSON-lines (`.jsonl`, `.jsonl.gz`) and Parquet (`.parquet`) files, or folders of them.

Every record is one book: its `text` field (a string) is the book, an optional `id` field (a string or an
integer) its id; without an `id`, the id is `<file>:<index>`, the file's path inside the source folder (its
name for a single file) and the 0-based line index (JSON lines) or row index (Parquet). Ids must be
unique. Texts are cleaned like `folder` books (Gutenberg header/footer, line endings).

The texts are copied, one after another, into one temporary file ($TMPDIR) for the run, and each book is a
slice of it, so worker processes read their books without parsing the records again. The token file of a
book is `files/<id>.npy` when the id is a plain file name, else a name made of its plain characters and a
hash of the id (`sources.safe_stem`). Parquet needs pyarrow (`pip install -e '.[parquet]'`), imported only
when a Parquet source is read.
"""

import contextlib
import glob
import gzip
import json
import os
import tempfile
import zlib

from tqdm import tqdm

from languini.common_lib.errors import UserError
from languini.dataset_lib.sources import BookRef, check_unique_ids, safe_stem
from languini.dataset_lib.sources.gutenberg import clean_gutenberg

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
CLEANING = "Gutenberg header/footer stripped (if any), CRLF -> LF, outer whitespace stripped"
ID_RULE = "ids (the `id` field, else <file>:<index>) must be unique"


def kind_of(path: str) -> str | None:
    """`jsonl` or `parquet` for a file with such a suffix, else None."""
    if path.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if path.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def input_files(path: str, suffixes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(file, name used in default ids) of a single file, or of every matching file under a folder."""
    if os.path.isfile(path):
        if not path.endswith(suffixes):
            raise UserError(f"{path} is not a {' / '.join(suffixes)} file")
        return [(path, os.path.basename(path))]
    if not os.path.isdir(path):
        raise UserError(f"no such file or folder: {path}")
    files = sorted(
        f for suffix in suffixes
        for f in glob.glob(os.path.join(glob.escape(path), "**", f"*{suffix}"), recursive=True)
        if os.path.isfile(f)
    )  # fmt: skip
    if not files:
        raise UserError(f"no {' / '.join(suffixes)} files found in {path}")
    return [(f, os.path.relpath(f, path).replace(os.sep, "/")) for f in files]


def _book_id(value, default: str, where: str) -> str:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"{where}: the `id` must be a string or an integer, not {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise UserError(f"{where}: the `id` is empty")
    return str(value)


def _jsonl_records(file: str, name: str):
    """Yield (book id, text, where) of every non-blank line of a JSON-lines file (gzip when it ends in .gz)."""
    opener = gzip.open if file.endswith(".gz") else open
    try:
        with opener(file, "rb") as f:
            for index, raw in enumerate(f):
                where = f"{file} line {index + 1}"
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except UnicodeDecodeError:
                    raise UserError(f"{where} is not valid UTF-8") from None
                except ValueError as e:
                    raise UserError(f"{where} is not valid JSON ({e})") from None
                if not isinstance(record, dict):
                    raise UserError(f"{where} is a JSON {type(record).__name__}, not an object with a `text` field")
                text = record.get("text")
                if not isinstance(text, str):
                    raise UserError(f"{where} has no `text` string field")
                yield _book_id(record.get("id"), f"{name}:{index}", where), text, where
    except (OSError, EOFError, zlib.error) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{file} is damaged, truncated or unreadable ({reason})") from None


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading Parquet needs pyarrow: pip install -e '.[parquet]'") from None
    return pq


def _parquet_records(file: str, name: str):
    """Yield (book id, text, where) of every row of a Parquet file (columns `text` and optional `id`)."""
    pq = _pyarrow_parquet()
    import pyarrow as pa

    try:
        parquet = pq.ParquetFile(file)
        schema = parquet.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{file} is not a readable Parquet file ({str(e).strip().splitlines()[0]})") from None
    if "text" not in schema.names:
        raise UserError(f"{file} has no `text` column (columns: {', '.join(schema.names)})")
    text_type = schema.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise UserError(f"{file}: the `text` column holds {text_type}, not strings")
    columns = ["text"] + (["id"] if "id" in schema.names else [])
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=256, columns=columns):
            texts = batch.column("text").to_pylist()
            ids = batch.column("id").to_pylist() if "id" in columns else [None] * len(texts)
            for text, value in zip(texts, ids):
                where = f"{file} row {row}"
                if text is None:
                    raise UserError(f"{where}: the `text` is null")
                yield _book_id(value, f"{name}:{row}", where), text, where
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{file} is damaged or truncated ({str(e).strip().splitlines()[0]})") from None


@contextlib.contextmanager
def open_books(path: str, kind: str, progress: bool = True):
    """Yield (books, description) of a JSON-lines or Parquet source (`kind` 'jsonl' or 'parquet')."""
    suffixes, read = (JSONL_SUFFIXES, _jsonl_records) if kind == "jsonl" else (PARQUET_SUFFIXES, _parquet_records)
    files = input_files(path, suffixes)
    if kind == "parquet":
        _pyarrow_parquet()  # the install hint before anything else
    with tempfile.TemporaryDirectory(prefix="languini-records-") as tmp:
        texts = os.path.join(tmp, "texts.bin")
        refs = []
        with open(texts, "wb") as out, tqdm(desc=f"reading {kind}", unit="book", disable=not progress) as bar:
            for file, name in files:
                for book_id, text, where in read(file, name):
                    bar.update()
                    data = text.encode("utf-8", "surrogatepass")
                    refs.append(BookRef(book_id=book_id, path=texts, clean=clean_gutenberg, size=len(data),
                                        offset=out.tell(), length=len(data), label=where,
                                        rel_path=f"files/{safe_stem(book_id)}.npy"))
                    out.write(data)
        if not refs:
            raise UserError(f"no books (records) found in {path}")
        check_unique_ids(refs, path, ID_RULE)
        _check_unique_files(refs, path)
        yield refs, {"kind": kind, "path": os.path.abspath(path), "files": len(files), "cleaning": CLEANING}


def _check_unique_files(refs: list[BookRef], where: str):
    """Two ids that differ only in characters a file name cannot hold must still get two token files."""
    seen = {}
    for ref in refs:
        other = seen.setdefault(ref.token_file, ref)
        if other is not ref:
            raise UserError(f"the ids '{other.book_id}' and '{ref.book_id}' in {where} give the same token file "
                            f"{ref.token_file}; make the ids differ in letters or digits")
