"""Unit tests of the data pipeline's parts: text cleaning, splits, integrity hash, chunked encoding."""

import hashlib
import io
import os

import numpy as np
import pytest

from languini.common_lib.errors import UserError
from languini.dataset_lib.integrity_test import KNOWN_HASHES, file_sizes, hashed_folder, integrity_hash
from languini.dataset_lib.integrity_test import main as integrity_main
from languini.dataset_lib.sources import BookRef, read_raw, safe_stem
from languini.dataset_lib.sources.demo import markdown_to_text
from languini.dataset_lib.sources.gutenberg import clean_gutenberg, normalise_newlines
from languini.dataset_lib.splits import assign_splits, choose_subset, stable_hash
from languini.dataset_lib.tokenise_books import encode_text, newline_chunks
from languini.dataset_lib.tokenizer_model import load_processor, train_tokenizer
from languini.dataset_lib.verify import compare_manifests, verify_dataset


def test_gutenberg_header_footer_and_crlf_are_stripped():
    raw = (
        "The Project Gutenberg EBook of X\r\nlicence blah\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\nChapter 1\r\nIt was a dark night.\r\r\n"
        "***END OF THE PROJECT GUTENBERG EBOOK X ***\r\nMore licence\r\n"
    )
    cleaned = clean_gutenberg(raw)
    assert cleaned == "Chapter 1\nIt was a dark night."
    assert "\r" not in cleaned and "licence" not in cleaned


def test_text_without_markers_is_kept_and_lone_cr_becomes_lf():
    assert clean_gutenberg("  a\r\nb\rc  \n") == "a\nb\nc"
    assert normalise_newlines("a\r\n\r\nb") == "a\n\nb"


def test_markdown_markup_becomes_plain_text():
    md = (
        "# Macbeth\n\n## ACT I\n\n### SCENE I. A desert place.\n\n_Thunder and lightning. Enter three\nWitches_\n\n"
        "**First Witch**  \nWhen shall we three meet again  \nIn thunder?\n\n_\\[Aside]_  \nAnon\\--now.\n"
    )
    assert markdown_to_text(md) == (
        "Macbeth\n\nACT I\n\nSCENE I. A desert place.\n\nThunder and lightning. Enter three\nWitches\n\n"
        "First Witch\nWhen shall we three meet again\nIn thunder?\n\n[Aside]\nAnon--now."
    )


def _refs(n, authors=None):
    return [BookRef(book_id=f"book{i:03d}", path=f"/x/{i}.txt", clean=str, size=i,
                    author=None if authors is None else f"a{i % authors}") for i in range(n)]


def test_splits_are_deterministic_disjoint_and_order_independent():
    refs = _refs(200)
    first = assign_splits(refs, 0.1)
    again = assign_splits(list(reversed(refs)), 0.1)
    ids = {s: [r.book_id for r in books] for s, books in first.items()}
    assert ids == {s: [r.book_id for r in books] for s, books in again.items()}
    assert set(ids["train"]).isdisjoint(ids["test"])
    assert sorted(ids["train"] + ids["test"]) == sorted(r.book_id for r in refs)
    assert 5 <= len(ids["test"]) <= 40  # about 10% of 200
    assert all(stable_hash(b) < 0.1 for b in ids["test"]) and all(stable_hash(b) >= 0.1 for b in ids["train"])


def test_a_subset_keeps_the_test_share():
    refs = _refs(2000)
    subset = choose_subset(refs, 400)
    assert len(subset) == 400 and choose_subset(list(reversed(refs)), 400) == subset
    assert 20 <= len(assign_splits(subset, 0.1)["test"]) <= 60  # about 40, not skewed by the choice


def test_stable_hash_is_fixed():
    expected = int.from_bytes(hashlib.sha256(b"pg1342").digest()[:8], "big") / 2**64
    assert stable_hash("pg1342") == expected


def test_small_corpora_get_at_least_one_book_in_each_split():
    for n in (2, 3, 5):
        splits = assign_splits(_refs(n), 0.01)
        assert len(splits["test"]) >= 1 and len(splits["train"]) >= 1
    splits = assign_splits(_refs(3), 0.99)
    assert len(splits["train"]) >= 1
    with pytest.raises(UserError, match="at least 2"):
        assign_splits(_refs(1), 0.1)
    with pytest.raises(UserError, match="between 0 and 1"):
        assign_splits(_refs(5), 1.5)


def test_author_split_holds_out_whole_authors():
    splits = assign_splits(_refs(120, authors=30), 0.2, split_by="author")
    train_authors = {r.author for r in splits["train"]}
    test_authors = {r.author for r in splits["test"]}
    assert test_authors and train_authors and train_authors.isdisjoint(test_authors)
    with pytest.raises(UserError, match="author_key"):
        assign_splits(_refs(10), 0.2, split_by="author")


def test_fixed_splits_keep_source_order():
    refs = [BookRef(book_id=f"b{i}", path="p", clean=str, size=1, split="train" if i % 3 else "test")
            for i in range(9)]
    splits = assign_splits(refs, 0.5)
    assert [r.book_id for r in splits["test"]] == ["b0", "b3", "b6"]
    assert [r.book_id for r in splits["train"]] == ["b1", "b2", "b4", "b5", "b7", "b8"]


def _write(path, size):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x" * size)


def test_integrity_hash_of_a_known_tree(tmp_path, capsys):
    root = tmp_path / "tree"
    _write(str(root / "b.npy"), 5)
    _write(str(root / "sub" / "a.npy"), 12)
    _write(str(root / "sub" / "deeper" / "c.npy"), 0)
    _write(str(root / "z" / "a.npy"), 3)  # same base name in another folder: sorted by (name, size)
    lines = "3\ta.npy\n12\ta.npy\n5\tb.npy\n0\tc.npy\n"
    expected = hashlib.sha256(lines.encode()).hexdigest()
    assert integrity_hash(file_sizes(str(root))) == expected
    assert integrity_main([str(root)]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_integrity_of_a_dataset_folder_covers_its_token_files(tmp_path, capsys):
    dataset = tmp_path / "books_16384"
    _write(str(dataset / "files" / "x.npy"), 7)
    _write(str(dataset / "meta.json"), 100)
    expected = hashlib.sha256(b"7\tx.npy\n").hexdigest()
    assert hashed_folder(str(dataset)) == str(dataset / "files")
    integrity_main([str(dataset)])
    assert capsys.readouterr().out.strip() == expected
    integrity_main([str(dataset), "--all"])
    assert capsys.readouterr().out.strip() == hashlib.sha256(b"100\tmeta.json\n7\tx.npy\n").hexdigest()


def test_verify_original_data_without_meta_uses_the_published_hash(tmp_path):
    _write(str(tmp_path / "books_16384" / "files" / "a.npy"), 10)
    digest, problems = verify_dataset(str(tmp_path / "books_16384"))
    assert digest == hashlib.sha256(b"10\ta.npy\n").hexdigest()
    assert problems == [f"hash {digest} differs from the published {KNOWN_HASHES['books_16384']}"]
    _write(str(tmp_path / "other" / "files" / "a.npy"), 10)
    with pytest.raises(UserError, match="no meta.json"):
        verify_dataset(str(tmp_path / "other"))


def test_compare_manifests_names_each_problem():
    expected = {"files/a.npy": 10, "files/b.npy": 20, "files/c.npy": 30}
    actual = {"files/a.npy": 10, "files/b.npy": 21, "files/d.npy": 5}
    assert compare_manifests(expected, actual) == [
        "missing: files/c.npy", "extra: files/d.npy", "resized: files/b.npy (20 -> 21 bytes)"]
    assert compare_manifests(expected, dict(expected)) == []


def test_newline_chunked_encoding_equals_whole_book_encoding():
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "  spoke", "of", "war", "123", "é", "\t", "night"]
    lines = [" ".join(rng.choice(words, 12)) for _ in range(3000)]
    text = "\n".join(lines) + "\n\n end"
    model = train_tokenizer([text], vocab_size=300)
    sp = load_processor(model)
    whole = encode_text(sp, text, cut_at_newlines=False)
    chunked = encode_text(sp, text, cut_at_newlines=True)
    assert len(newline_chunks(text)) > 1
    assert np.array_equal(whole, chunked)
    assert sp.decode(chunked.tolist()) == text
    assert "".join(newline_chunks(text, size=100)) == text


def test_tokenizer_has_the_special_ids_and_no_bos_eos():
    sp = load_processor(train_tokenizer(["hello world\nhow are you\n" * 50], vocab_size=280))
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "<unk>", "<D>"]
    assert sp.bos_id() == -1 and sp.eos_id() == -1
    assert sp.encode("hello <D>")[-1] == 2
    with pytest.raises(UserError, match="vocab"):
        train_tokenizer(["tiny text"], vocab_size=5000)
    with pytest.raises(UserError):
        load_processor(io.BytesIO(b"junk").getvalue())


def test_safe_stem_keeps_plain_ids_and_hashes_the_others():
    assert safe_stem("pg1234") == "pg1234" and safe_stem("book-1.v2_x") == "book-1.v2_x"
    for book_id in ("a/b", "../x", "web.jsonl:17", "x" * 101, "日本", ".hidden", "trailing."):
        stem = safe_stem(book_id)
        assert stem != book_id and "/" not in stem and len(stem) <= 77 and not stem.startswith(".")
        assert stem.endswith(hashlib.sha256(book_id.encode()).hexdigest()[:16])
    assert safe_stem("web.jsonl:17") == f"web.jsonl_17-{hashlib.sha256(b'web.jsonl:17').hexdigest()[:16]}"
    assert safe_stem("a:b") != safe_stem("a?b")  # one plain form, two ids: the hash tells them apart


def test_a_book_can_be_a_slice_of_a_file(tmp_path):
    path = tmp_path / "texts.bin"
    path.write_bytes(b"first bookSECOND")
    ref = BookRef(book_id="b", path=str(path), clean=str.strip, size=6, offset=10, length=6, label="x.jsonl line 2")
    assert read_raw(ref) == b"SECOND" and ref.origin == "x.jsonl line 2"


def test_integrity_test_mistakes_are_one_line(capsys):
    """The seed command `integrity_test.py` gives one `error:` line (exit 2) like every other command."""
    for argv in ([], ["some/dir", "--al"]):
        with pytest.raises(SystemExit) as exit_info:
            integrity_main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith("error: integrity_test.py: ") and "\n" not in err, err
