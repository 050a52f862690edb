"""`languini data add-split` and the JSON-lines / Parquet sources, on a tiny folder corpus prepared once.

The new split must hold exactly what the corpus's own SentencePiece model makes of the cleaned books, be
seen by verify, info, read_split_tokens and the stream loader, refuse name clashes and books of the train
split (by content hash, and by token arrays for datasets prepared before the hashes were recorded), and
resume after a crash like prepare does.
"""

import gzip
import json
import os
import shutil
import sys

import numpy as np
import pytest
from test_data_prepare import VOCAB, book_text, make_books, run_folder

from languini.common_lib.file_lock import exclusive_lock
from languini.dataset_lib import add_split as add_split_module
from languini.dataset_lib import tokenise_books as tokenise_module
from languini.dataset_lib.cli import main as data_main
from languini.dataset_lib.languini_books import LanguiniDatasetIterator, read_split_tokens
from languini.dataset_lib.layout import (
    END_OF_DOC,
    corpus_identity,
    list_splits,
    read_books,
    read_file_list,
    read_meta,
)
from languini.dataset_lib.sources.gutenberg import clean_gutenberg
from languini.dataset_lib.tokenizer_model import load_processor
from languini.dataset_lib.verify import verify_dataset

DATASET = f"tiny_{VOCAB}"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(data_root, dataset folder) of a tiny corpus prepared once; tests change a copy (`fresh`)."""
    root = tmp_path_factory.mktemp("add_split")
    run_folder(make_books(root / "books", n=8), root / "out")
    return str(root / "out"), str(root / "out" / DATASET)


@pytest.fixture
def fresh(prepared, tmp_path):
    data_root = str(tmp_path / "out")
    shutil.copytree(prepared[0], data_root)
    return data_root, os.path.join(data_root, DATASET)


def new_books(path, seeds=(50, 51, 52)) -> str:
    """A folder of books that are not in the corpus: `new<seed>.txt`."""
    os.makedirs(path, exist_ok=True)
    for seed in seeds:
        with open(os.path.join(path, f"new{seed}.txt"), "w", encoding="utf-8", newline="") as f:
            f.write(book_text(seed, lines=40))
    return str(path)


def add(dataset, name, source, *extra) -> int:
    try:
        return data_main(["add-split", str(source), "--dataset", dataset, "--name", name, "--workers", "1",
                          "--no-progress", *extra])
    except SystemExit as e:
        return e.code


def one_line_error(capsys, dataset, name, source, *extra) -> str:
    assert add(dataset, name, source, *extra) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert sum(line.startswith("error: ") for line in lines) == 1, err
    return lines[-1]


def expected_tokens(dataset, texts) -> list[np.ndarray]:
    sp = load_processor(os.path.join(dataset, "tokenizer.model"))
    return [np.array(sp.encode(clean_gutenberg(t)), dtype=np.int64) for t in texts]


def stream_tokens(dataset, split, seq_len=64) -> np.ndarray:
    """The one stream of a split as the loader gives it (batch 1, no repeat), padding cut off."""
    loader = LanguiniDatasetIterator(dataset, split, 1, [0], 1, seq_len, "cpu", repeat=False)
    windows = [(x.reshape(-1).numpy(), pad.reshape(-1).numpy()) for x, _, pad in loader]
    first = windows[0][0][:1]
    targets = np.concatenate([x[1:] if i == 0 else x for i, (x, _) in enumerate(windows)])
    return np.concatenate([first, targets])


def test_round_trip_tokens_verify_info_loader(fresh, tmp_path, capsys):
    data_root, dataset = fresh
    source = new_books(tmp_path / "held_out")
    before, identity = read_meta(dataset), corpus_identity(dataset)
    assert add(dataset, "extra", source) == 0
    assert "--eval_data_split extra" in capsys.readouterr().out

    texts = [open(os.path.join(source, f"new{s}.txt"), encoding="utf-8", newline="").read() for s in (50, 51, 52)]
    books = expected_tokens(dataset, texts)
    rows = read_books(dataset, "extra")
    assert [rel for rel, _ in rows] == [f"files/extra/new{s}.npy" for s in (50, 51, 52)]
    for (rel, count), tokens in zip(rows, books):
        stored = np.load(os.path.join(dataset, rel))
        assert stored.dtype == np.uint16 and count == len(tokens) and np.array_equal(stored, tokens)
    whole = np.concatenate([np.append(t, END_OF_DOC) for t in books])
    assert np.array_equal(read_split_tokens(dataset, "extra"), whole)
    assert np.array_equal(stream_tokens(dataset, "extra")[: len(whole)], whole)

    meta = read_meta(dataset)
    assert meta["splits"]["extra"]["books"] == 3 and meta["splits"]["extra"]["tokens"] == len(whole) - 3
    assert meta["splits"]["extra"]["added"]["source"]["kind"] == "folder"
    assert set(meta["book_sha256"]["extra"]) == {rel for rel, _ in rows}
    assert meta["fingerprint"] == before["fingerprint"] and meta["integrity_sha256"] != before["integrity_sha256"]
    assert {k: v for k, v in meta["splits"].items() if k != "extra"} == before["splits"]
    assert list_splits(data_root) == ["train", "test", "extra"]
    assert corpus_identity(dataset) == identity  # runs trained before can be scored on the new split
    assert verify_dataset(dataset) == (meta["integrity_sha256"], [])
    assert not os.path.exists(os.path.join(dataset, ".add-split-extra.json"))

    assert data_main(["verify", dataset, "--no-progress"]) == 0
    assert data_main(["info", dataset]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "split extra: added" in out and "extra" in out.split("text MB")[1]

    # the same command again is a no-op; damage to the split's files is repaired by it
    assert add(dataset, "extra", source) == 0
    assert "already in" in capsys.readouterr().out
    os.remove(os.path.join(dataset, rows[1][0]))
    assert verify_dataset(dataset)[1]
    assert add(dataset, "extra", source) == 0
    assert verify_dataset(dataset)[1] == [] and read_meta(dataset) == meta


def test_name_clashes_and_unsafe_names_are_one_line(fresh, tmp_path, capsys):
    _, dataset = fresh
    source = new_books(tmp_path / "held_out")
    for name in ("test", "train", "all", "iid", "stats"):
        assert "is reserved" in one_line_error(capsys, dataset, name, source)
    for name in ("../x", "bad-name", "9lives", "a b", "x" * 65):
        assert "not a safe identifier" in one_line_error(capsys, dataset, name, source)
    assert add(dataset, "extra", source) == 0
    other = new_books(tmp_path / "other", seeds=(60, 61))
    line = one_line_error(capsys, dataset, "extra", other)
    assert "already has a split 'extra'" in line
    assert [rel for rel, _ in read_books(dataset, "extra")] == [f"files/extra/new{s}.npy" for s in (50, 51, 52)]


@pytest.mark.parametrize("hashes", ["recorded", "older dataset"])
def test_books_of_the_train_split_are_refused(fresh, tmp_path, capsys, hashes):
    data_root, dataset = fresh
    if hashes == "older dataset":  # prepared before book_sha256 was recorded: compared by token arrays
        meta = read_meta(dataset)
        del meta["book_sha256"]
        with open(os.path.join(dataset, "meta.json"), "w") as f:
            json.dump(meta, f)
    train_file = read_file_list(data_root, "train")[0][0]  # files/pg1NN.npy
    source = new_books(tmp_path / "held_out")
    book = os.path.basename(train_file)[: -len(".npy")]
    with open(os.path.join(source, "renamed_copy.txt"), "w", encoding="utf-8", newline="") as f:
        f.write(book_text(int(book[2:]) - 100))  # the train book's text under another name
    line = one_line_error(capsys, dataset, "extra", source)
    assert "1 book(s)" in line and "renamed_copy.txt" in line and train_file in line and "train split" in line
    assert "extra" not in list_splits(data_root)
    assert not os.path.exists(os.path.join(dataset, "files", "extra"))
    assert not os.path.exists(os.path.join(dataset, ".add-split-extra.json"))


def test_an_interrupted_add_split_resumes(fresh, tmp_path, capsys, monkeypatch):
    data_root, dataset = fresh
    source = new_books(tmp_path / "held_out", seeds=(50, 51, 52, 53, 54))
    real = add_split_module.tokenise_books
    written = []

    def crash_after_two(*args, **kwargs):
        for i, result in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            written.append(result.book_id)
            yield result

    monkeypatch.setattr(add_split_module, "tokenise_books", crash_after_two)
    assert add(dataset, "extra", source) == 130  # interrupted
    assert "extra" not in list_splits(data_root) and "extra" not in read_meta(dataset)["splits"]
    assert os.path.isfile(os.path.join(dataset, ".add-split-extra.json"))
    assert any("unfinished" in p for p in verify_dataset(dataset)[1])
    # another source under the same name is refused until the unfinished one is finished or removed
    assert "unfinished split 'extra'" in one_line_error(capsys, dataset, "extra", new_books(tmp_path / "b", (70,)))

    split_dir = os.path.join(dataset, "files", "extra")
    finished = {name: os.path.getmtime(os.path.join(split_dir, name)) for name in os.listdir(split_dir)}
    assert len(finished) >= len(written) == 2
    retokenised = []
    real_write = tokenise_module.write_token_file

    def counting_write(path, *args):
        retokenised.append(path)
        real_write(path, *args)

    monkeypatch.setattr(add_split_module, "tokenise_books", real)
    monkeypatch.setattr(tokenise_module, "write_token_file", counting_write)
    assert add(dataset, "extra", source) == 0
    assert len(retokenised) == 5 - len(finished)  # only the books the crash left undone
    assert all(os.path.getmtime(os.path.join(split_dir, name)) == t for name, t in finished.items())
    assert verify_dataset(dataset)[1] == []
    texts = [book_text(s, lines=40) for s in (50, 51, 52, 53, 54)]
    whole = np.concatenate([np.append(t, END_OF_DOC) for t in expected_tokens(dataset, texts)])
    assert np.array_equal(read_split_tokens(dataset, "extra"), whole)


def test_add_split_holds_the_corpus_lock(fresh, tmp_path, capsys):
    data_root, dataset = fresh
    with exclusive_lock(data_root, "corpus folder"):
        line = one_line_error(capsys, dataset, "extra", new_books(tmp_path / "held_out"))
    assert f"corpus folder {data_root} is in use by pid {os.getpid()}" in line


def test_a_rerun_of_prepare_keeps_an_added_split(fresh, prepared, tmp_path, capsys):
    data_root, dataset = fresh
    assert add(dataset, "extra", new_books(tmp_path / "held_out")) == 0
    meta = read_meta(dataset)
    os.remove(os.path.join(dataset, read_file_list(data_root, "train")[0][0]))  # damage: prepare repairs it
    books = os.path.join(os.path.dirname(prepared[0]), "books")
    run_folder(books, data_root)
    repaired = read_meta(dataset)
    assert repaired["splits"] == meta["splits"] and repaired["book_sha256"] == meta["book_sha256"]
    assert verify_dataset(dataset)[1] == []


def write_jsonl(path, records, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


def test_jsonl_source_for_prepare_and_add_split(tmp_path, capsys):
    folder = tmp_path / "jsonl"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl.gz", [{"text": book_text(i), "id": f"book-{i}"} for i in range(6)], gz=True)
    write_jsonl(folder / "b.jsonl", [{"text": book_text(i)} for i in range(6, 10)] + [""])  # ids b.jsonl:0..3
    out = tmp_path / "data" / "web"
    assert data_main(["prepare", "jsonl", str(folder), "--out", str(out), "--vocab-size", str(VOCAB),
                      "--test-fraction", "0.25", "--workers", "1", "--no-progress"]) == 0
    dataset = str(out / f"web_{VOCAB}")
    meta = read_meta(dataset)
    assert meta["source"]["kind"] == "jsonl" and sum(s["books"] for s in meta["splits"].values()) == 10
    files = {rel for split in ("train", "test") for rel, _ in read_books(dataset, split)}
    assert {f"files/book-{i}.npy" for i in range(6)} <= files
    assert len([f for f in files if f.startswith("files/b.jsonl_")]) == 4  # `b.jsonl:N` needs a safe file name
    sp = load_processor(os.path.join(dataset, "tokenizer.model"))
    assert np.load(os.path.join(dataset, "files", "book-3.npy")).tolist() == sp.encode(clean_gutenberg(book_text(3)))

    held_out = write_jsonl(tmp_path / "held_out.jsonl", [{"text": book_text(50), "id": 7}, {"text": book_text(51)}])
    assert add(dataset, "web_extra", held_out) == 0
    rows = read_books(dataset, "web_extra")
    assert rows[0][0] == "files/web_extra/7.npy" and len(rows) == 2
    whole = np.concatenate([np.append(t, END_OF_DOC) for t in expected_tokens(dataset, [book_text(50), book_text(51)])])
    assert np.array_equal(read_split_tokens(dataset, "web_extra"), whole)
    assert verify_dataset(dataset)[1] == []


@pytest.mark.parametrize("lines,message", [
    ([{"text": "a", "id": "x"}, {"text": "b", "id": "x"}], "share the id 'x'"),
    (['{"text": "a"', ], "line 1 is not valid JSON"),
    ([{"title": "no text"}], "line 1 has no `text` string field"),
    ([["not", "an", "object"]], "not an object"),
    ([{"text": "a", "id": [1]}], "`id` must be a string or an integer"),
])  # fmt: skip
def test_bad_jsonl_is_one_line(fresh, tmp_path, capsys, lines, message):
    _, dataset = fresh
    source = write_jsonl(tmp_path / "bad.jsonl", lines)
    assert message in one_line_error(capsys, dataset, "extra", source)


def test_a_damaged_jsonl_gz_and_a_mixed_folder_are_one_line(fresh, tmp_path, capsys):
    _, dataset = fresh
    good = write_jsonl(tmp_path / "good.jsonl.gz", [{"text": book_text(50)}] * 1, gz=True)
    data = open(good, "rb").read()
    with open(tmp_path / "cut.jsonl.gz", "wb") as f:
        f.write(data[: len(data) // 2])
    assert "damaged, truncated" in one_line_error(capsys, dataset, "extra", tmp_path / "cut.jsonl.gz")
    mixed = new_books(tmp_path / "mixed")
    shutil.copy(good, mixed)
    assert "mixes jsonl and txt files" in one_line_error(capsys, dataset, "extra", mixed)


def test_parquet_without_pyarrow_says_how_to_install_it(fresh, tmp_path, capsys, monkeypatch):
    _, dataset = fresh
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "books.parquet").write_bytes(b"PAR1")
    line = one_line_error(capsys, dataset, "extra", tmp_path / "books.parquet")
    assert "pip install -e '.[parquet]'" in line


def test_parquet_source_for_prepare_and_add_split(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"text": [book_text(i) for i in range(8)], "id": [f"p{i}" for i in range(8)]}),
                   folder / "part-0.parquet")
    out = tmp_path / "data" / "pq"
    assert data_main(["prepare", "parquet", str(folder), "--out", str(out), "--vocab-size", str(VOCAB),
                      "--test-fraction", "0.25", "--workers", "1", "--no-progress"]) == 0
    dataset = str(out / f"pq_{VOCAB}")
    assert read_meta(dataset)["source"]["kind"] == "parquet"
    held_out = tmp_path / "held_out.parquet"
    pq.write_table(pa.table({"text": [book_text(50), book_text(51)]}), held_out)  # ids held_out.parquet:0, :1
    assert add(dataset, "pq_extra", held_out) == 0
    whole = np.concatenate([np.append(t, END_OF_DOC) for t in expected_tokens(dataset, [book_text(50), book_text(51)])])
    assert np.array_equal(read_split_tokens(dataset, "pq_extra"), whole)
    assert verify_dataset(dataset)[1] == []
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "no_text.parquet")
    assert "no `text` column" in one_line_error(capsys, dataset, "other", tmp_path / "no_text.parquet")


def test_a_split_added_to_each_vocabulary_of_a_corpus_shares_its_file_list(fresh, prepared, tmp_path, capsys):
    data_root, dataset = fresh
    books = os.path.join(os.path.dirname(prepared[0]), "books")
    other = os.path.join(data_root, run_folder(books, data_root, vocab_size=300)["dataset"])  # tiny_300
    identity = corpus_identity(other)
    source = new_books(tmp_path / "held_out")
    assert add(dataset, "extra", source) == 0
    assert add(other, "extra", source) == 0  # the corpus's list is kept, this dataset gets its own counts
    assert corpus_identity(other) == identity
    for path in (dataset, other):
        texts = [book_text(s, lines=40) for s in (50, 51, 52)]
        whole = np.concatenate([np.append(t, END_OF_DOC) for t in expected_tokens(path, texts)])
        assert np.array_equal(read_split_tokens(path, "extra"), whole) and verify_dataset(path)[1] == []
    assert len(read_split_tokens(dataset, "extra")) != len(read_split_tokens(other, "extra"))
