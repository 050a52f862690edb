"""PG-19 (DeepMind's public-domain Project Gutenberg books) from its public Google Cloud Storage bucket.

The bucket `<base-url>` = `https://storage.googleapis.com/deepmind-gutenberg` holds `train/`, `validation/`
and `test/` folders of `<id>.txt` books. We list them with the GCS JSON API
(`https://storage.googleapis.com/storage/v1/b/deepmind-gutenberg/o?prefix=train/`, paged by
`nextPageToken`; every object has `name`, `size` and a base64 `md5Hash`) and download
`<base-url>/<name>` in parallel threads into the cache. A download goes to `<file>.part` and is renamed
only after its size and MD5 match the listing, so a file that exists is complete and re-runs skip it.
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
from languini.dataset_lib.sources import BookRef, cache_dir
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
        items += page.get("items", [])
        token = page.get("nextPageToken")
        if not token:
            return items


def _download_once(url: str, dest: str, size: int, md5_b64: str | None):
    part = dest + ".part"
    digest = hashlib.md5()
    with _get(url) as response, open(part, "wb") as f:
        for block in iter(lambda: response.read(1 << 20), b""):
            digest.update(block)
            f.write(block)
    got_size = os.path.getsize(part)
    got_md5 = base64.b64encode(digest.digest()).decode()
    if got_size != size or (md5_b64 and got_md5 != md5_b64):
        os.remove(part)
        raise ValueError(f"checksum mismatch for {url}: {got_size} bytes, md5 {got_md5}; expected {size}, {md5_b64}")
    os.replace(part, dest)


def download(base_url: str, item: dict, dest: str):
    """Fetch one object to dest, verified, retrying a few times."""
    url = f"{base_url.rstrip('/')}/{urllib.parse.quote(item['name'])}"
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    for attempt in range(RETRIES):
        try:
            return _download_once(url, dest, int(item["size"]), item.get("md5Hash"))
        except (urllib.error.URLError, ValueError, ConnectionError, TimeoutError) as e:
            if attempt == RETRIES - 1:
                raise UserError(f"cannot download {url} after {RETRIES} tries: {e}") from None
            time.sleep(RETRY_WAIT * 2**attempt)


@contextlib.contextmanager
def open_books(base_url: str = DEFAULT_BASE_URL, download_dir: str | None = None, workers: int = 8,
               max_books: int | None = None):
    """Yield (books, description): download what is missing, then every split's books."""
    download_dir = download_dir or cache_dir("pg19")
    refs, todo = [], []
    for folder, split in FOLDERS.items():
        items = [i for i in list_objects(base_url, f"{folder}/") if i["name"].endswith(".txt")]
        items.sort(key=lambda i: stable_hash(i["name"]))  # data order: a deterministic shuffle
        for item in items[:max_books] if max_books else items:
            dest = os.path.join(download_dir, *item["name"].split("/"))
            if not (os.path.isfile(dest) and os.path.getsize(dest) == int(item["size"])):
                todo.append((item, dest))
            book_id = os.path.splitext(os.path.basename(item["name"]))[0]
            refs.append(BookRef(book_id=book_id, path=dest, clean=clean_gutenberg, size=int(item["size"]), split=split))
    if not refs:
        raise UserError(f"no .txt books listed under {base_url} (train/, validation/, test/)")
    pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
    try:
        jobs = [pool.submit(download, base_url, item, dest) for item, dest in todo]
        for job in tqdm(concurrent.futures.as_completed(jobs), total=len(jobs), unit="book", desc="downloading",
                        disable=not jobs):
            job.result()
    finally:
        pool.shutdown(cancel_futures=True)
    yield refs, {"kind": "pg19", "base_url": base_url, "max_books_per_split": max_books,
                 "cleaning": "Gutenberg header/footer stripped (if any), CRLF -> LF, outer whitespace stripped"}
