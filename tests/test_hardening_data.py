"""The data pipeline against damaged or hostile input: each test names the threat it guards against.

Threats: a hostile PG-19 listing whose object names would write outside the download folder; file lists
whose rows point outside the dataset (`..`, absolute paths, escaping symlinks); two preparations writing
into one corpus folder at once, and a killed one leaving a stale lock; corrupt or truncated archives read
only up to the damage; token files damaged in place (same size, so the manifest cannot see it) or deleted
file lists that `verify` missed; a deleted file list that a re-run did not restore; token files with bad
headers, wrong sizes or out-of-vocabulary ids reaching the model; environment failures (damaged meta.json,
read-only or full disk, over-long names, `ulimit -f`, non-UTF-8 books) ending in a traceback instead of one
line; and a run resumed or evaluated on a corpus that changed under it (corpus identity).
"""

import errno
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse

import numpy as np
import pytest
from conftest import REPO_ROOT, make_synthetic_corpus
from test_data_prepare import VOCAB, book_text, make_books, run_folder

from languini.common_lib import atomic_io
from languini.common_lib.errors import UserError
from languini.common_lib.file_lock import LOCK_FILE, exclusive_lock
from languini.dataset_lib.cli import main as data_main
from languini.dataset_lib.languini_books import LanguiniDatasetIterator, read_split_tokens
from languini.dataset_lib.layout import corpus_identity, read_books, read_file_list, split_counts_path
from languini.dataset_lib.sources import books3
from languini.dataset_lib.splits import stable_hash

DATASET = f"tiny_{VOCAB}"


def assert_one_error_line(stderr: str) -> str:
    """stderr ends with exactly one `error: ...` line and holds no traceback (progress notes may precede it)."""
    lines = stderr.splitlines()
    assert lines and lines[-1].startswith("error: "), stderr
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in stderr, stderr
    return lines[-1]


def one_line_error(capsys, argv, code=2) -> str:
    """Run `languini data ARGV`, expect exit `code` and one error line; return that line."""
    with pytest.raises(SystemExit) as exc:
        data_main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == code, err
    return assert_one_error_line(err)


def prepare_argv(books, out, *extra):
    return ["prepare", "folder", str(books), "--out", str(out), "--name", "tiny", "--vocab-size", str(VOCAB),
            "--test-fraction", "0.25", "--workers", "1", "--no-progress", *extra]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(data_root, dataset folder) of a tiny corpus prepared once; tests change a copy (`fresh`)."""
    root = tmp_path_factory.mktemp("hardening")
    run_folder(make_books(root / "books", n=6), root / "out")
    return str(root / "out"), str(root / "out" / DATASET)


@pytest.fixture
def fresh(prepared, tmp_path):
    data_root = str(tmp_path / "out")
    shutil.copytree(prepared[0], data_root)
    return data_root, os.path.join(data_root, DATASET)


# --- 1. a hostile PG-19 listing ---------------------------------------------------------------------------------

class HostileBucket(http.server.BaseHTTPRequestHandler):
    """Serves `server.listing(prefix)` as the GCS JSON API listing; logs every download in `server.downloads`."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path.startswith("/storage/v1/b/"):
            body = json.dumps(self.server.listing(urllib.parse.parse_qs(url.query)["prefix"][0])).encode()
        else:
            self.server.downloads.append(url.path)
            body = b"a book\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def hostile_bucket():
    """A local bucket on 127.0.0.1 (`.url`; set `.listing`); its server thread stops by itself within 30 s."""
    server = http.server.HTTPServer(("127.0.0.1", 0), HostileBucket)
    server.timeout, server.downloads = 0.05, []
    server.url = f"http://127.0.0.1:{server.server_address[1]}/bucket"
    done, deadline = threading.Event(), time.monotonic() + 30

    def serve():
        while not done.is_set() and time.monotonic() < deadline:
            server.handle_request()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server
    done.set()
    thread.join(timeout=5)
    server.server_close()


def _object(name: str) -> dict:
    return {"name": name, "size": "7", "md5Hash": "x"}


@pytest.mark.parametrize("name", ["train/../../escaped.txt", "train/../../../tmp/escaped.txt", "/tmp/escaped.txt",
                                  "train/a/../../../escaped.txt", "train/\0.txt"])
def test_pg19_refuses_listed_names_that_leave_the_download_folder(hostile_bucket, tmp_path, capsys, name):
    """Threat: a hostile or broken bucket listing whose object names (`..`, absolute) write outside the cache."""
    hostile_bucket.listing = lambda prefix: {"items": [_object(name)] if prefix == "train/" else []}
    cache = tmp_path / "deep" / "cache"
    err = one_line_error(capsys, ["prepare", "pg19", "--base-url", hostile_bucket.url, "--download-dir", str(cache),
                                  "--out", str(tmp_path / "out"), "--no-progress"])
    assert "refusing it" in err
    assert hostile_bucket.downloads == [] and not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "out").exists()


def test_pg19_refuses_a_symlink_that_leads_out_of_the_download_folder(hostile_bucket, tmp_path, capsys):
    """Threat: a download folder whose subfolder is a symlink elsewhere, so downloads would land outside it."""
    hostile_bucket.listing = lambda prefix: {"items": [_object(f"{prefix}1.txt")]}
    elsewhere, cache = tmp_path / "elsewhere", tmp_path / "cache"
    elsewhere.mkdir()
    cache.mkdir()
    (cache / "train").symlink_to(elsewhere)
    err = one_line_error(capsys, ["prepare", "pg19", "--base-url", hostile_bucket.url, "--download-dir", str(cache),
                                  "--out", str(tmp_path / "out"), "--no-progress"])
    assert "'train/1.txt' points outside" in err
    assert hostile_bucket.downloads == [] and os.listdir(elsewhere) == []


@pytest.mark.parametrize("listing", [["not", "an", "object"], {"items": [{"name": 5}]},
                                     {"items": [{"name": "train/1.txt", "size": "many"}]}])
def test_pg19_malformed_listing_is_one_line(hostile_bucket, tmp_path, capsys, listing):
    """Threat: a listing that is valid JSON but not what the GCS API returns ends in a traceback."""
    hostile_bucket.listing = lambda prefix: listing
    one_line_error(capsys, ["prepare", "pg19", "--base-url", hostile_bucket.url, "--download-dir", str(tmp_path / "c"),
                            "--out", str(tmp_path / "out"), "--no-progress"])


# --- 2. file lists pointing outside the dataset ---------------------------------------------------------------

def _point_first_row_at(data_root: str, target: str):
    rows = read_file_list(data_root, "train")
    np.save(os.path.join(data_root, "file_list_train.npy"), np.array([(target, rows[0][1])] + rows[1:], dtype=str))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_file_list_rows_outside_the_dataset_are_refused(fresh, tmp_path, capsys, kind):
    """Threat: a file list (downloaded, or edited) whose rows make the loader or verify read any file."""
    data_root, dataset = fresh
    outside = str(tmp_path / "outside.npy")
    count = read_books(dataset, "train")[0][1]
    np.save(outside, np.full(count, 5, dtype=np.uint16))  # a perfectly valid book, in the wrong place
    if kind == "symlink":
        os.symlink(outside, os.path.join(dataset, "files", "escape.npy"))
        target = "files/escape.npy"
    else:
        target = os.path.relpath(outside, dataset) if kind == "dotdot" else outside
    _point_first_row_at(data_root, target)
    with pytest.raises(UserError, match="points outside"):
        next(LanguiniDatasetIterator(dataset, "train", 1, [0], 1, 8, "cpu"))
    with pytest.raises(UserError, match="points outside"):
        read_split_tokens(dataset, "train")
    capsys.readouterr()
    assert data_main(["verify", dataset, "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "points outside" in out and "FAILED" in out


def test_books3_split_list_rows_outside_the_dataset_are_refused(tmp_path):
    """Threat: books3 split lists (from a download) whose rows would make prepare write token files anywhere."""
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "x.epub.txt").write_text("text")
    (tmp_path / "lists").mkdir()
    np.save(tmp_path / "lists" / "file_list_train.npy", np.array([["files/../../x.epub.npy", "3"]]))
    with pytest.raises(UserError, match="points outside the dataset folder"):
        with books3.open_books(str(tmp_path / "tree"), str(tmp_path / "lists")):
            pass


def test_data_linked_in_through_a_symlink_still_loads(prepared, tmp_path, capsys):
    """Threat: the outside-path checks refusing data linked in the documented way (`ln -s .../data data`)."""
    os.symlink(prepared[0], tmp_path / "linked")
    dataset = str(tmp_path / "linked" / DATASET)
    assert len(read_split_tokens(dataset, "test")) > 0
    assert data_main(["verify", dataset, "--no-progress"]) == 0


# --- 3. the lock on a prepare output folder ---------------------------------------------------------------------

def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    """Threat: two commands writing one folder at once; the refusal must say who holds it."""
    folder = str(tmp_path / "corpus")
    with exclusive_lock(folder, "corpus folder"):
        record = json.loads((tmp_path / "corpus" / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] and record["command"]
        with pytest.raises(UserError, match=rf"^corpus folder {folder} is in use by pid {os.getpid()} \(command "):
            with exclusive_lock(folder, "corpus folder"):
                pass
    with exclusive_lock(folder, "corpus folder"):  # released: free again
        pass
    assert (tmp_path / "corpus" / LOCK_FILE).read_text() == ""


def test_lock_file_planted_as_a_symlink_is_refused(tmp_path):
    """Threat: a symlink in place of the lock file makes the lock write the holder's record elsewhere."""
    (tmp_path / "victim").write_text("keep me")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / LOCK_FILE).symlink_to(tmp_path / "victim")
    with pytest.raises(UserError, match="symbolic link"):
        with exclusive_lock(str(tmp_path / "f")):
            pass
    assert (tmp_path / "victim").read_text() == "keep me"


HOLDER = """
import sys, time
from languini.dataset_lib import prepare as p
from languini.dataset_lib.cli import main
real = p.tokenise_books
def pause_after_one(*args, **kwargs):
    for result in real(*args, **kwargs):
        yield result
        print("PAUSED", flush=True)
        time.sleep(120)
p.tokenise_books = pause_after_one
main(sys.argv[1:])
"""


def _data_cli(*argv):
    return [sys.executable, "-c", "import sys; from languini.dataset_lib.cli import main; sys.exit(main())", *argv]


def test_second_prepare_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    """Threat: two `data prepare` runs interleaving writes in one corpus folder; a SIGKILLed run blocking
    every later run with a stale lock."""
    books, out = make_books(tmp_path / "books", n=6), tmp_path / "out"
    argv = prepare_argv(books, out)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, *argv], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "PAUSED"  # the holder is inside prepare, lock held
        second = subprocess.run(_data_cli(*argv), capture_output=True, text=True, env=env, timeout=60)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"error: corpus folder {out} is in use by pid {holder.pid} (command " in second.stderr
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
        holder.wait()
    third = subprocess.run(_data_cli(*argv), capture_output=True, text=True, env=env, timeout=120)
    assert third.returncode == 0, third.stderr
    verify = subprocess.run(_data_cli("verify", str(out / DATASET), "--no-progress"), capture_output=True,
                            text=True, env=env, timeout=60)
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stdout + verify.stderr


# --- 4. corrupt and truncated archives -----------------------------------------------------------------------

def _archive(tmp_path, suffix: str) -> str:
    books = make_books(tmp_path / "books", n=6)
    path = str(tmp_path / f"corpus{suffix}")
    mode = {".tar": "w", ".tar.gz": "w:gz", ".tar.xz": "w:xz", ".tar.bz2": "w:bz2"}[suffix]
    with tarfile.open(path, mode) as tar:
        tar.add(books, arcname="books")
    return path


def _damage(path: str, suffix: str, how: str):
    data = bytearray(open(path, "rb").read())
    if how == "truncated":
        del data[len(data) * 3 // 5 :]
    elif suffix == ".tar":  # a plain tar checks only its headers: flip bytes in the 4th member's header
        with tarfile.open(path) as tar:
            at = tar.getmembers()[4].offset + 100
        data[at : at + 8] = bytes(b ^ 0xFF for b in data[at : at + 8])
    else:
        mid = len(data) // 2
        data[mid : mid + 8] = bytes(b ^ 0xFF for b in data[mid : mid + 8])
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tar.xz", ".tar.bz2"])
@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_damaged_archive_fails_whole_and_prepares_nothing(tmp_path, capsys, suffix, how):
    """Threat: a corrupt or truncated download read up to the damage, silently preparing part of a corpus."""
    archive = _archive(tmp_path, suffix)
    _damage(archive, suffix, how)
    err = one_line_error(capsys, prepare_argv(archive, tmp_path / "out"))
    assert f"archive {archive} is damaged or truncated" in err
    assert not (tmp_path / "out").exists()


def test_archive_that_is_not_an_archive_is_one_line(tmp_path, capsys):
    """Threat: an empty or foreign file named like an archive ends in a tarfile traceback."""
    for content in (b"", b"just some text\n" * 100):
        (tmp_path / "x.tar.gz").write_bytes(content)
        one_line_error(capsys, prepare_argv(tmp_path / "x.tar.gz", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# --- 5. verify checks content ------------------------------------------------------------------------------------

def _rewrite_same_size(path: str, change):
    """Apply `change` to a token file's array and save it back; the size must not change (so only content
    checks can see it)."""
    size = os.path.getsize(path)
    tokens = np.load(path)
    np.save(path, change(tokens))
    assert os.path.getsize(path) == size


def test_verify_checks_headers_dtypes_lengths_ids_and_file_lists(fresh, capsys):
    """Threat: token files damaged in place (same size, so the manifest hash misses it), wrong counts, and a
    deleted file list, all passing `verify` unnoticed."""
    data_root, dataset = fresh
    rows = read_books(dataset, "train")
    paths = [os.path.join(dataset, rel) for rel, _ in rows]
    with open(paths[0], "r+b") as f:
        f.write(b"garbage!")  # the npy magic and header are gone
    _rewrite_same_size(paths[1], lambda t: t.astype(np.int16))
    _rewrite_same_size(paths[2], lambda t: np.concatenate([t[:-1], [VOCAB + 7]]).astype(np.uint16))
    counts = np.load(split_counts_path(dataset, "train"))
    counts[3] += 1
    np.save(split_counts_path(dataset, "train"), counts)
    os.remove(os.path.join(data_root, "file_list_test_iid.npy"))
    assert data_main(["verify", dataset]) == 1
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert "checking token files" in captured.err  # the progress bar
    assert any(f"{paths[0]} is damaged" in line for line in out)
    assert any(f"{paths[1]} holds int16 values, expected uint16" in line for line in out)
    assert any(f"{paths[2]} holds id {VOCAB + 7}, outside the vocabulary of {VOCAB}" in line for line in out)
    assert any(f"{paths[3]} holds ({rows[3][1]},) tokens but the split list says {rows[3][1] + 1}" in line
               for line in out)
    assert any("missing file list:" in line and "file_list_test_iid.npy (split test)" in line for line in out)
    assert len(out) == 6 and "FAILED (5 problem(s))" in out[-1]


def test_verify_of_an_intact_dataset_is_ok(fresh, capsys):
    """Threat: content checks that cry wolf on good data."""
    assert data_main(["verify", fresh[1], "--no-progress"]) == 0
    assert "OK" in capsys.readouterr().out


# --- 6. a deleted file list is restored ----------------------------------------------------------------------

def test_rerun_restores_a_deleted_file_list_and_counts(fresh, prepared, tmp_path, capsys):
    """Threat: a re-run says 'already prepared' while a file list is gone, leaving a corpus nothing can read."""
    data_root, dataset = fresh
    os.remove(os.path.join(data_root, "file_list_train.npy"))
    os.remove(split_counts_path(dataset, "test"))
    capsys.readouterr()
    assert data_main(prepare_argv(make_books(tmp_path / "books", n=6), data_root)) == 0
    assert "already prepared" not in capsys.readouterr().out
    for name in ("file_list_train.npy", os.path.join(DATASET, "split_counts", "file_list_test_iid.npy")):
        with open(os.path.join(prepared[0], name), "rb") as a, open(os.path.join(data_root, name), "rb") as b:
            assert a.read() == b.read()
    assert data_main(["verify", dataset, "--no-progress"]) == 0


# --- 7. the loader checks each book it opens ---------------------------------------------------------------------

@pytest.fixture
def synth(tmp_path):
    """A synthetic corpus (vocab 256, no meta.json) and the path of its first train book."""
    dataset = make_synthetic_corpus(str(tmp_path / "c"), splits={"train": [40, 30, 50], "test": [20, 20]})
    return dataset, os.path.join(dataset, read_books(dataset, "train")[0][0])


def _loaders(dataset, vocab_size=None):
    """Both ways a split is read: the stream loader (first batch) and the final evaluation's whole split."""
    yield lambda: next(LanguiniDatasetIterator(dataset, "train", 1, [0], 1, 16, "cpu", vocab_size=vocab_size))
    yield lambda: read_split_tokens(dataset, "train", vocab_size=vocab_size)


def test_loader_refuses_ids_outside_the_vocabulary(synth):
    """Threat: an out-of-vocabulary id reaching the embedding (an IndexError, or a device assert on GPU)."""
    dataset, book = synth
    tokens = np.load(book)
    tokens[5] = 300
    np.save(book, tokens)
    for load in _loaders(dataset, vocab_size=256):
        with pytest.raises(UserError, match=f"{book} holds id 300, outside the vocabulary of 256"):
            load()
    with open(os.path.join(dataset, "meta.json"), "w") as f:  # the vocabulary recorded by `prepare`
        json.dump({"vocab_size": 256}, f)
    for load in _loaders(dataset):
        with pytest.raises(UserError, match="outside the vocabulary of 256"):
            load()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "trailing bytes", "float"])
def test_loader_names_a_damaged_token_file(synth, damage):
    """Threat: a truncated or garbage token file surfacing as an IndexError or a numpy traceback."""
    dataset, book = synth
    data = open(book, "rb").read()
    damaged = {"truncated": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b"",
               "trailing bytes": data + b"\0" * 6}.get(damage)
    if damaged is None:
        np.save(book, np.load(book).astype(np.float32))
    else:
        open(book, "wb").write(damaged)
    for load in _loaders(dataset):
        with pytest.raises(UserError, match=f"token file {book} "):
            load()


# --- 8. environment failures give one line -----------------------------------------------------------------------

@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"files": 3}', "\udcff"])
def test_damaged_meta_json_is_one_line_for_prepare_verify_and_info(fresh, tmp_path, capsys, content):
    """Threat: a damaged meta.json (disk error, hand edit) ending every data command in a JSON traceback."""
    data_root, dataset = fresh
    with open(os.path.join(dataset, "meta.json"), "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(content)
    books = make_books(tmp_path / "books", n=6)
    for argv in (prepare_argv(books, data_root), ["verify", dataset], ["info", dataset]):
        assert "meta.json is damaged" in one_line_error(capsys, argv)


def test_read_only_output_folder_is_one_line(tmp_path, capsys):
    """Threat: an output folder without write permission ending in a PermissionError traceback."""
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as root: permissions do not stop writes (see the simulated EROFS/EACCES test)")
        assert "cannot write" in one_line_error(capsys, prepare_argv(make_books(tmp_path / "books", n=6), out))
    finally:
        out.chmod(0o700)


@pytest.mark.parametrize("code,message,writes_before", [
    (errno.ENOSPC, "disk full", 0), (errno.ENOSPC, "disk full", 4), (errno.EROFS, "cannot write", 1),
    (errno.EACCES, "cannot write", 3), (errno.EFBIG, "file size limit", 2), (errno.EIO, "cannot read or write", 5),
])
def test_write_failures_while_preparing_are_one_line(tmp_path, capsys, monkeypatch, code, message, writes_before):
    """Threat: a full disk, a file system turned read-only, or an I/O error mid-preparation ending in a
    traceback (simulated in-process: the n-th atomic write fails), and a half-written dataset looking done."""
    real, calls = atomic_io.atomic_open, []

    def failing(path, mode="wb"):
        calls.append(path)
        if len(calls) > writes_before:
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real(path, mode)

    monkeypatch.setattr(atomic_io, "atomic_open", failing)
    out = tmp_path / "out"
    assert message in one_line_error(capsys, prepare_argv(make_books(tmp_path / "books", n=6), out))
    assert not (out / DATASET / "meta.json").exists()


def test_book_name_too_long_for_a_file_name_is_one_line(tmp_path, capsys):
    """Threat: a book whose token file name exceeds the file system's limit (ENAMETOOLONG) mid-run."""
    books = make_books(tmp_path / "books", n=4)
    long_name = "b" * 246 + ".txt"  # fits as a book, not as `.<id>.npy.XXXXXXXX.tmp`
    (tmp_path / "books" / long_name).write_text(book_text(99))
    err = one_line_error(capsys, prepare_argv(books, tmp_path / "out"))
    assert "too long for its token file" in err and "rename the book" in err
    assert not (tmp_path / "out").exists()


def test_strict_names_the_non_utf8_train_book(tmp_path, capsys):
    """Threat: --strict blaming the vocabulary size for a non-UTF-8 book read while training the tokenizer."""
    books = make_books(tmp_path / "books", n=6)
    bad = next(f"bad{i}" for i in range(100) if stable_hash(f"bad{i}") >= 0.25)  # lands in the train split
    (tmp_path / "books" / f"{bad}.txt").write_bytes(book_text(7).encode() + b"caf\xe9\n")
    err = one_line_error(capsys, prepare_argv(books, tmp_path / "out", "--strict"))
    assert f"{bad}.txt is not valid UTF-8" in err and "vocab" not in err


ULIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
from languini.dataset_lib.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_file_size_limit_is_one_line(tmp_path):
    """Threat: `ulimit -f` (RLIMIT_FSIZE: SIGXFSZ, then EFBIG) killing a preparation or ending in a traceback."""
    argv = prepare_argv(make_books(tmp_path / "books", n=6), tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", ULIMIT, *argv], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "file size limit" in assert_one_error_line(done.stderr)
    assert not (tmp_path / "out" / DATASET / "meta.json").exists()


# --- 9. corpus identity -----------------------------------------------------------------------------------------

def test_corpus_identity_changes_with_lists_and_tokenizer_only(tmp_path):
    """Threat: resuming or evaluating a run on a corpus whose books or tokenizer changed under it."""
    dataset = make_synthetic_corpus(str(tmp_path / "c"))
    data_root = os.path.dirname(dataset)
    first = corpus_identity(dataset)
    assert first["tokenizer_sha256"] is None and len(first["file_lists_sha256"]) == 64
    with open(os.path.join(dataset, "tokenizer.model"), "wb") as f:
        f.write(b"model one")
    with_model = corpus_identity(dataset)
    assert with_model == {"tokenizer_sha256": hashlib.sha256(b"model one").hexdigest(),
                          "file_lists_sha256": first["file_lists_sha256"]}
    book = os.path.join(dataset, read_books(dataset, "train")[0][0])
    np.save(book, np.load(book)[::-1])  # token files are not part of the identity (and are never read)
    assert corpus_identity(dataset) == with_model
    rows = read_file_list(data_root, "train")
    changes = [rows[::-1], rows[:-1], [(rows[0][0], rows[0][1] + 1)] + rows[1:]]
    for changed in changes:
        np.save(os.path.join(data_root, "file_list_train.npy"), np.array(changed, dtype=str))
        assert corpus_identity(dataset)["file_lists_sha256"] != first["file_lists_sha256"]
    np.save(os.path.join(data_root, "file_list_train.npy"), np.array(rows, dtype=str))
    assert corpus_identity(dataset) == with_model
    shutil.copy(os.path.join(data_root, "file_list_test_iid.npy"), os.path.join(data_root, "file_list_test_x.npy"))
    assert corpus_identity(dataset)["file_lists_sha256"] != first["file_lists_sha256"]
    with open(os.path.join(dataset, "tokenizer.model"), "wb") as f:
        f.write(b"model two")
    assert corpus_identity(dataset)["tokenizer_sha256"] == hashlib.sha256(b"model two").hexdigest()
    with pytest.raises(UserError, match="no file lists"):
        corpus_identity(str(tmp_path / "empty" / "d_1"))


def test_data_command_mistakes_are_one_line_and_flags_are_never_abbreviated(tmp_path, capsys):
    """Threat: a usage block instead of one line, or a typo such as `--vocab 320` taken as `--vocab-size`."""
    books = make_books(tmp_path / "books", n=4)
    line = one_line_error(capsys, ["prepare", "folder", books, "--vocab", "320", "--no-progress"])
    assert "unrecognized arguments: --vocab 320" in line
    assert "invalid choice" in one_line_error(capsys, ["prepare", "nosuchsource"])
    assert not os.path.exists(tmp_path / "data")
