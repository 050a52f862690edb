"""PG-19 (DeepMind's public-domain Project Gutenberg books) from its public Google Cloud Storage bucket.

The bucket `<base-url>` = `https://storage.googleapis.com/deepmind-gutenberg` holds `train/`, `validation/`
and `test/` folders of `<id>.txt` books. We list them with the GCS JSON API
(`https://storage.googleapis.com/storage/v1/b/deepmind-gutenberg/o?prefix=train/`, paged by
`nextPageToken`; every object has `name`, `size` and a base64 `md5Hash`) and download
`<base-url>/<name>` in parallel threads into the cache. A download goes to `<file>.part` and is renamed
only after its size and MD5 match the listing, so a file that exists is complete and re-runs skip it.
The listing is not trusted: an object name that is absolute, climbs out with `..` or leads outside the
download folder through a symlink is refused before anything is downloaded, and no download is stored
past the size the listing gave.
Splits: train -> train, test -> test (file_list_test_iid.npy), validation -> validation.
"""

import base64
import concurrent.futures
import contextlib
import hashlib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request

from tqdm import tqdm

from languini.common_lib.errors import UserError
from languini.common_lib.file_lock import exclusive_lock
from languini.dataset_lib.layout import path_inside
from languini.dataset_lib.sources import BookRef, cache_dir, check_unique_ids
from languini.dataset_lib.sources.gutenberg import clean_gutenberg
from languini.dataset_lib.splits import stable_hash

DEFAULT_BASE_URL = "https://storage.googleapis.com/deepmind-gutenberg"
FOLDERS = {"train": "train", "validation": "validation", "test": "test"}  # bucket folder -> split name
RETRIES = 3
RETRY_WAIT = 1.0  # seconds, doubled after each failed try


def listing_url(base_url: str) -> str:
    """`https://host/bucket` -> `https://host/storage/v1/b/bucket/o` (the JSON API's object listing)."""
    parts = urllib.parse.urlsplit(base_url.rstrip("/"))
    root, _, bucket = parts.path.rpartition("/")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, f"{root}/storage/v1/b/{bucket}/o", "", ""))


def _get(url: str, timeout: float = 60):
    return urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "languini"}), timeout=timeout)


def list_objects(base_url: str, prefix: str) -> list[dict]:
    """Every object under prefix: dicts with name, size and md5Hash."""
    items, token = [], None
    while True:
        query = {"prefix": prefix, "fields": "items(name,size,md5Hash),nextPageToken"}
        if token:
            query["pageToken"] = token
        url = f"{listing_url(base_url)}?{urllib.parse.urlencode(query)}"
        try:
            with _get(url) as response:
                page = json.load(response)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise UserError(f"cannot list {url}: {e}") from None
        if not isinstance(page, dict) or not isinstance(page.get("items", []), list):
            raise UserError(f"the listing {url} is not a GCS JSON API object listing")
        items += page.get("items", [])
        token = page.get("nextPageToken")
        if not token:
            return items


def _checked_item(item, prefix: str, download_dir: str) -> tuple[str, int, str | None, str]:
    """(name, size, md5, download path) of a listed object; refuse a name that could write outside
    `download_dir` (absolute, `..`, a symlink leading out) and malformed entries, in one line each."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise UserError(f"malformed entry in the {prefix} listing: {str(item)[:100]!r}")
    name = item["name"]
    dest = path_inside(download_dir, name, f"object name in the {prefix} listing")
    if not name.startswith(prefix):
        raise UserError(f"object {name!r} in the {prefix} listing is not under {prefix}; refusing it")
    try:
        size = int(item.get("size"))
    except (TypeError, ValueError):
        size = -1
    if size < 0 or not isinstance(item.get("md5Hash", ""), str):
        raise UserError(f"object {name!r} in the {prefix} listing has no valid size and MD5")
    return name, size, item.get("md5Hash"), dest


def _no_follow(path: str, flags: int) -> int:
    """Open for `open(..., opener=)` without following a symlink planted in the download's place."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o666)


def _download_once(url: str, dest: str, size: int, md5_b64: str | None):
    part = dest + ".part"
    digest = hashlib.md5()
    with _get(url) as response, open(part, "wb", opener=_no_follow) as f:
        for block in iter(lambda: response.read(1 << 20), b""):
            digest.update(block)
            f.write(block)
            if f.tell() > size:  # never store more than the listing promised
                break
    got_size = os.path.getsize(part)
    got_md5 = base64.b64encode(digest.digest()).decode()
    if got_size != size or (md5_b64 and got_md5 != md5_b64):
        os.remove(part)
        raise ValueError(f"checksum mismatch for {url}: {got_size} bytes, md5 {got_md5}; expected {size}, {md5_b64}")
    os.replace(part, dest)


def download(base_url: str, name: str, size: int, md5_b64: str | None, dest: str):
    """Fetch one object to dest, verified, retrying a few times."""
    url = f"{base_url.rstrip('/')}/{urllib.parse.quote(name)}"
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    for attempt in range(RETRIES):
        try:
            return _download_once(url, dest, size, md5_b64)
        except (urllib.error.URLError, ValueError, ConnectionError, TimeoutError) as e:
            if attempt == RETRIES - 1:
                raise UserError(f"cannot download {url} after {RETRIES} tries: {e}") from None
            time.sleep(RETRY_WAIT * 2**attempt)


def _plan(base_url: str, download_dir: str, max_books: int | None) -> tuple[list[BookRef], list[tuple]]:
    """(every split's books, the downloads still missing), from the bucket's listing."""
    refs, todo = [], []
    for folder, split in FOLDERS.items():
        prefix = f"{folder}/"
        items = [_checked_item(i, prefix, download_dir) for i in list_objects(base_url, prefix)]
        items = sorted((i for i in items if i[0].endswith(".txt")), key=lambda i: stable_hash(i[0]))  # data order
        for name, size, md5_b64, dest in items[:max_books] if max_books else items:
            if not (os.path.isfile(dest) and os.path.getsize(dest) == size):
                todo.append((name, size, md5_b64, dest))
            book_id = os.path.splitext(os.path.basename(name))[0]
            refs.append(BookRef(book_id=book_id, path=dest, clean=clean_gutenberg, size=size, split=split))
    if not refs:
        raise UserError(f"no .txt books listed under {base_url} (train/, validation/, test/)")
    check_unique_ids(refs, base_url)
    return refs, todo


def _download_all(base_url: str, todo: list[tuple], workers: int):
    pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
    try:
        jobs = [pool.submit(download, base_url, *job) for job in todo]
        for job in tqdm(concurrent.futures.as_completed(jobs), total=len(jobs), unit="book", desc="downloading",
                        disable=not jobs):
            job.result()
    finally:
        pool.shutdown(cancel_futures=True)


@contextlib.contextmanager
def open_books(base_url: str = DEFAULT_BASE_URL, download_dir: str | None = None, workers: int = 8,
               max_books: int | None = None):
    """Yield (books, description): download what is missing, then every split's books.

    The download folder is locked while downloading, so two runs never write the same file.
    """
    download_dir = download_dir or cache_dir("pg19")
    refs, todo = _plan(base_url, download_dir, max_books)
    if todo:
        with exclusive_lock(download_dir, "download folder"):
            _download_all(base_url, todo, workers)
    yield refs, {"kind": "pg19", "base_url": base_url, "max_books_per_split": max_books,
                 "cleaning": "Gutenberg header/footer stripped (if any), CRLF -> LF, outer whitespace stripped"}
