"""The stream dataloader: pins the semantics of docs/dataloader.md on small synthetic corpora."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import make_synthetic_corpus

from languini.common_lib.errors import UserError
from languini.dataset_lib.languini_books import (
    LanguiniDatasetIterator,
    distribute_books,
    read_split_tokens,
    stream_indices,
)
from languini.dataset_lib.layout import END_OF_DOC, PAD, read_books

LENGTHS = [7, 3, 12, 5, 9, 4]  # the worked example: streams [b0, b4], [b1, b3, b5], [b2]


@pytest.fixture
def corpus(tmp_path):
    """A corpus whose train and test splits both hold the six books of LENGTHS (different random tokens)."""
    return make_synthetic_corpus(str(tmp_path / "c"), splits={"train": LENGTHS, "test": LENGTHS})


def book_tokens(dataset_path, split):
    return [
        np.load(os.path.join(dataset_path, rel)).astype(np.int64)
        for rel, _ in read_books(dataset_path, split)
    ]


def loader(dataset_path, split="train", B=3, idxs=None, M=1, L=5, repeat=True):
    idxs = list(range(B)) if idxs is None else idxs
    return LanguiniDatasetIterator(dataset_path, split, B, idxs, M, L, "cpu", repeat=repeat)


def rows(batch):
    """(x, y, is_padded) of one step as [local streams, L] tensors (micro-batches flattened in order)."""
    return [t.reshape(-1, t.shape[-1]) for t in batch]


def test_distribute_books_worked_example():
    streams = distribute_books(LENGTHS, 3)
    assert streams == [[0, 4], [1, 3, 5], [2]]
    assert [sum(LENGTHS[b] for b in s) for s in streams] == [16, 12, 12]


def test_distribute_books_ties_go_to_lowest_index():
    assert distribute_books([5, 5, 5, 5], 2) == [[0, 2], [1, 3]]
    assert distribute_books([1, 1], 4) == [[0], [1], [], []]
    assert distribute_books([4, 1, 1, 1, 1, 1], 2) == [[0, 5], [1, 2, 3, 4]]  # tokens only, `<D>` not counted


def test_stream_indices():
    assert stream_indices(1, 4, 8) == [1, 5]
    assert sorted(sum((stream_indices(r, 3, 12) for r in range(3)), [])) == list(range(12))
    with pytest.raises(UserError):
        stream_indices(0, 3, 8)


def test_shapes_and_dtypes(corpus):
    x, y, pad = next(loader(corpus, B=4, M=2, L=6))
    assert x.shape == y.shape == pad.shape == (2, 2, 6)
    assert x.dtype == y.dtype == torch.int64 and pad.dtype == torch.bool
    assert x.is_contiguous() and y.is_contiguous()


def test_train_stream_content_and_wrap(corpus):
    books = book_tokens(corpus, "train")
    L, steps = 5, 8  # 8 windows of stream 0 run past its 18-token pass, so it wraps
    it = loader(corpus, L=L)
    batches = [rows(next(it)) for _ in range(steps)]
    s0 = np.concatenate([b[0][0].numpy() for b in batches] + [batches[-1][1][0][-1:].numpy()])
    # stream 0 = b0 <D> b4 <D> b0 <D> ...: no <D> before the first book, one between books, wraps to b0
    expected = np.concatenate([books[0], [END_OF_DOC], books[4], [END_OF_DOC]] * 3)[: steps * L + 1]
    np.testing.assert_array_equal(s0, expected)
    assert s0[0] == books[0][0]
    for k in range(steps - 1):  # consecutive windows share one token; y is x shifted by one
        assert batches[k + 1][0][0, 0] == batches[k][1][0, -1]
        assert torch.equal(batches[k][1][0, :-1], batches[k][0][0, 1:])
    assert not any(b[2].any() for b in batches)


def test_eval_streams_end_with_eod_then_padding(corpus):
    books = book_tokens(corpus, "test")
    L = 5
    batches = [rows(b) for b in loader(corpus, split="test", L=L, repeat=False)]
    # stream 1 = b1 <D> b3 <D> b5 <D> (15 tokens); stream 0 is the longest (18) and sets the step count
    assert len(batches) == -(-(18 - 1) // L)
    s1 = np.concatenate([b[0][1].numpy() for b in batches] + [batches[-1][1][1][-1:].numpy()])
    content = np.concatenate([books[1], [END_OF_DOC], books[3], [END_OF_DOC], books[5], [END_OF_DOC]])
    np.testing.assert_array_equal(s1[: len(content)], content)
    assert (s1[len(content) :] == PAD).all()
    targets = np.concatenate([b[1][1].numpy() for b in batches])
    padded = np.concatenate([b[2][1].numpy() for b in batches])
    np.testing.assert_array_equal(padded, np.arange(1, len(targets) + 1) >= len(content))
    assert (targets[padded] == PAD).all() and targets[~padded][-1] == END_OF_DOC


def test_exhausted_stream_gives_all_padding_rows(corpus):
    # stream 2 (13 tokens) is done after 3 windows of 4 while stream 0 (18 tokens) needs 5
    batches = [rows(b) for b in loader(corpus, split="test", L=4, repeat=False)]
    assert len(batches) == 5
    last_x, last_y, last_pad = batches[-1]
    assert last_pad[2].all() and (last_x[2] == PAD).all() and (last_y[2] == PAD).all()
    assert not last_pad[0].all()


def test_eval_stops_at_the_same_step_on_every_rank(corpus):
    counts = [sum(1 for _ in loader(corpus, split="test", idxs=[r], L=4, repeat=False)) for r in range(3)]
    assert counts == [5, 5, 5]


def reference_rows(dataset_path, split, B, L, steps, repeat):
    """{global stream: [(x, y, pad) per step]} from one process with one micro-batch."""
    it = loader(dataset_path, split, B=B, L=L, repeat=repeat)
    out = {i: [] for i in range(B)}
    for _ in range(steps):
        x, y, pad = rows(next(it))
        for i in range(B):
            out[i].append((x[i], y[i], pad[i]))
    return out


@pytest.mark.parametrize("split,repeat", [("train", True), ("test", False)])
def test_every_layout_reads_the_same_streams(tmp_path, split, repeat):
    lengths = [40, 13, 77, 25, 8, 60, 31, 19, 52, 11, 44, 36, 70, 9]
    path = make_synthetic_corpus(str(tmp_path / "c"), splits={split: lengths})
    B, L, steps = 6, 7, 6
    expected = reference_rows(path, split, B, L, steps, repeat)
    layouts = [(W, M) for W in range(1, B + 1) for M in range(1, B + 1) if B % (W * M) == 0]
    assert len(layouts) > 4
    for W, M in layouts:
        iters = [
            loader(path, split, B=B, idxs=stream_indices(r, W, B), M=M, L=L, repeat=repeat) for r in range(W)
        ]
        for step in range(steps):
            seen = set()
            for r, it in enumerate(iters):
                x, y, pad = next(it)
                assert x.shape == (M, B // W // M, L)
                idxs = stream_indices(r, W, B)
                for m in range(M):
                    for j in range(B // W // M):
                        g = idxs[m * (B // W // M) + j]
                        seen.add(g)
                        for got, want in zip((x[m, j], y[m, j], pad[m, j]), expected[g][step]):
                            assert torch.equal(got, want), (W, M, step, g)
            assert seen == set(range(B))


def test_resume_mid_book_gives_identical_batches(tmp_path):
    path = make_synthetic_corpus(
        str(tmp_path / "c"), splits={"train": [300, 120, 500, 260, 410, 90, 330, 200]}
    )
    B, M, L = 4, 2, 9
    full = loader(path, B=B, M=M, L=L)
    for _ in range(23):
        next(full)
    state = json.loads(json.dumps(full.state_dict()))  # plain ints and lists survive JSON
    books_offsets = [(book, offset) for _, book, offset in state["streams"]]
    assert any(offset > 0 for _, offset in books_offsets)  # mid-book, not at a boundary
    resumed = loader(path, B=B, M=M, L=L)
    resumed.load_state_dict(state)
    for _ in range(80):  # long enough to cross books and wrap around
        for a, b in zip(next(full), next(resumed)):
            assert torch.equal(a, b)


def test_state_of_one_rank_resumes_another(corpus):
    it0 = loader(corpus, idxs=[0], L=4)
    for _ in range(3):
        next(it0)
    other = loader(corpus, idxs=[1], L=4)
    other.load_state_dict(it0.state_dict())
    plain = loader(corpus, idxs=[1], L=4)
    for _ in range(3):
        next(plain)
    for a, b in zip(next(other), next(plain)):
        assert torch.equal(a, b)


def test_load_state_rejects_another_config(corpus):
    state = loader(corpus, L=4).state_dict()
    with pytest.raises(UserError, match="sequence_length"):
        loader(corpus, L=5).load_state_dict(state)


def test_read_split_tokens(corpus):
    books = book_tokens(corpus, "test")
    tokens = read_split_tokens(corpus, "test")
    assert tokens.dtype == np.int64
    expected = np.concatenate([np.append(b, END_OF_DOC) for b in books])
    np.testing.assert_array_equal(tokens, expected)
    assert tokens[0] != END_OF_DOC and tokens[-1] == END_OF_DOC
    assert (tokens == END_OF_DOC).sum() == len(LENGTHS)


def test_each_rank_opens_only_its_books(corpus):
    # rank 1 of 3 owns stream 1 = books 1, 3, 5: deleting the others must not matter to it
    for rel, _ in read_books(corpus, "train"):
        if rel.endswith(("_0000.npy", "_0002.npy", "_0004.npy")):
            os.remove(os.path.join(corpus, rel))
    it = loader(corpus, idxs=stream_indices(1, 3, 3), L=4)
    for _ in range(10):
        next(it)
    with pytest.raises(UserError, match="missing"):
        next(loader(corpus, idxs=[0], L=4))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(idxs=[0, 3]), "outside"),
        (dict(B=4, idxs=[0, 1, 2], M=2), "not divisible"),
        (dict(split="nope"), "not found"),
        (dict(B=8), "too few"),
    ],
)
def test_clear_errors(corpus, kwargs, message):
    with pytest.raises(UserError, match=message):
        loader(corpus, **kwargs)


def test_resized_token_file_is_reported(corpus):
    rel = read_books(corpus, "train")[0][0]
    np.save(os.path.join(corpus, rel), np.arange(3, 10, dtype=np.uint16)[:4])
    with pytest.raises(UserError, match="split list says 7"):
        next(loader(corpus, L=4))
