"""Evaluation metrics and protocols: the normalised-perplexity formula, validation on the stream loader,
the sliding-window protocol (batched == one window at a time) and the stateful protocol."""

import contextlib
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import preset_config
from torch import nn

from languini.common_lib.config import apply_overrides
from languini.common_lib.errors import UserError
from languini.dataset_lib.languini_books import (
    LanguiniDatasetIterator,
    distribute_books,
    read_split_tokens,
    stream_indices,
)
from languini.dataset_lib.layout import read_books
from languini.projects.gpt.model import Model as GPT
from languini.train_lib.eval_metrics import evaluate_on_loader, metrics_from_sums, score_batch
from languini.train_lib.eval_protocols import (
    cap_tokens,
    evaluate_sliding_window,
    evaluate_stateful,
    stream_rows,
    window_batch,
    window_starts,
)
from languini.train_lib.token_lengths import TokenLengths

NO_AUTOCAST = contextlib.nullcontext()


def random_lengths(vocab_size: int, seed: int = 0) -> TokenLengths:
    g = torch.Generator().manual_seed(seed)
    chars = torch.randint(0, 5, (vocab_size,), generator=g)
    return TokenLengths(chars=chars, bytes=chars + torch.randint(0, 3, (vocab_size,), generator=g))


def tiny_gpt(vocab_size=64, seq_len=16, seed=0):
    cfg = apply_overrides(
        preset_config("gpt", "nano"),
        dict(vocab_size=vocab_size, seq_len=seq_len, n_layers=2, h_dim=32, mlp_dim=64, head_dim=8, n_heads=4),
    )
    torch.manual_seed(seed)
    return GPT(cfg).eval()


class CumsumRNN(nn.Module):
    """A stateful toy model: h_t = state + Σ_{s<=t} emb(x_s); logits = W tanh(h_t). fp64 inside."""

    def __init__(self, vocab_size=32, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab_size, dim, dtype=torch.float64)
        self.out = nn.Linear(dim, vocab_size, dtype=torch.float64)
        self.calls = []

    def get_init_state(self, batch_size, device):
        return torch.zeros(batch_size, self.emb.embedding_dim, dtype=torch.float64, device=device)

    def forward(self, x, state):
        self.calls.append(tuple(x.shape))
        h = state[:, None] + self.emb(x).cumsum(1)
        return self.out(torch.tanh(h)), h[:, -1]


# ---- the formula ---------------------------------------------------------------------------------------


def test_normalised_ppl_on_a_hand_computed_example():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log().expand(4, 4).clone()  # every position predicts the same distribution
    targets = torch.tensor([3, 2, 1, 2])
    scored = torch.tensor([True, True, True, False])  # the last target is padding
    lengths = TokenLengths(chars=torch.tensor([0, 1, 3, 2]), bytes=torch.tensor([0, 1, 3, 4]))

    m = metrics_from_sums(score_batch(logits, targets, scored, lengths), with_chars=True)

    # scored targets 3, 2, 1: probabilities .4 .3 .2, characters 2 + 3 + 1 = 6, bytes 4 + 3 + 1 = 8
    nats = -(math.log(0.4) + math.log(0.3) + math.log(0.2))
    assert m["n_tokens"] == 3 and m["n_chars"] == 6 and m["n_bytes"] == 8
    assert m["loss"] == pytest.approx(nats / 3, rel=1e-6)
    assert m["ppl"] == pytest.approx((1 / (0.4 * 0.3 * 0.2)) ** (1 / 3), rel=1e-6)
    assert m["normalised_loss"] == pytest.approx(nats / 6, rel=1e-6)
    assert m["normalised_ppl"] == pytest.approx((1 / (0.4 * 0.3 * 0.2)) ** (1 / 6), rel=1e-6)
    assert m["bits_per_byte"] == pytest.approx(-math.log2(0.4 * 0.3 * 0.2) / 8, rel=1e-6)
    assert m["top1"] == pytest.approx(1 / 3)  # only target 3 is the argmax
    assert m["top10"] == 1.0  # a vocabulary of 4: every target is in the top 10


def test_without_token_lengths_only_token_metrics():
    logits = torch.randn(2, 5, 7)
    m = metrics_from_sums(
        score_batch(logits, torch.randint(0, 7, (2, 5)), torch.ones(2, 5, dtype=torch.bool)), with_chars=False
    )
    assert m["n_tokens"] == 10 and m["loss"] > 0
    assert m["normalised_ppl"] is None and m["n_chars"] is None and m["bits_per_byte"] is None


def test_top_k_counts_ties_and_ranks():
    logits = torch.tensor([[[5.0] + [0.0] * 11, [0.0] + [float(-i) for i in range(11)]]])  # [1, 2, 12]
    targets = torch.tensor([[0, 11]])  # first: top-1; second: rank 11 of 12 -> outside the top 10
    m = metrics_from_sums(score_batch(logits, targets, torch.ones(1, 2, dtype=torch.bool)), with_chars=False)
    assert m["top1"] == 0.5 and m["top10"] == 0.5


# ---- validation during training ------------------------------------------------------------------------


def test_validation_scores_every_real_target_once_and_never_padding(synthetic_corpus):
    _, dataset_path = synthetic_corpus
    model = tiny_gpt(vocab_size=256, seq_len=32)
    loader = LanguiniDatasetIterator(
        dataset_path, "test", 2, stream_indices(0, 1, 2), 1, 32, "cpu", repeat=False
    )
    lengths = random_lengths(256)
    lengths.chars[0] = 1000  # padding, were it scored, would show in n_chars
    m = evaluate_on_loader(model, loader, NO_AUTOCAST, max_steps=-1, char_counts=lengths)

    # two streams, each its books followed by <D>; every token but a stream's first is a target
    rows = read_books(dataset_path, "test")
    streams = [
        np.concatenate([np.append(np.load(os.path.join(dataset_path, rows[b][0])), 2) for b in books])
        for books in distribute_books([n for _, n in rows], 2)
    ]
    assert m["n_tokens"] == sum(len(s) - 1 for s in streams)
    assert m["n_chars"] == sum(int(lengths.chars[torch.from_numpy(s[1:])].sum()) for s in streams)
    assert set(m) == {
        "loss",
        "ppl",
        "normalised_loss",
        "normalised_ppl",
        "bits_per_byte",
        "top1",
        "top10",
        "n_tokens",
        "n_chars",
        "n_bytes",
    }
    assert model.training is False


def test_validation_stops_after_max_steps_and_restores_train_mode(synthetic_corpus):
    _, dataset_path = synthetic_corpus
    model = tiny_gpt(vocab_size=256, seq_len=16).train()
    loader = LanguiniDatasetIterator(dataset_path, "test", 2, [0, 1], 1, 16, "cpu", repeat=False)
    m = evaluate_on_loader(model, loader, lambda: NO_AUTOCAST, max_steps=3)
    assert m["n_tokens"] == 3 * 2 * 16 and model.training


def test_validation_carries_the_state_across_batches():
    model = CumsumRNN()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, 32, (2, 40), generator=g)
    y = torch.randint(3, 32, (2, 40), generator=g)
    batches = [
        (x[None, :, i : i + 8], y[None, :, i : i + 8], torch.zeros(1, 2, 8, dtype=torch.bool))
        for i in range(0, 40, 8)
    ]
    m = evaluate_on_loader(model, iter(batches), NO_AUTOCAST, max_steps=-1)
    logits, _ = model(x, model.get_init_state(2, "cpu"))
    expected = F.cross_entropy(logits.reshape(-1, 32).float(), y.reshape(-1)).item()
    assert m["loss"] == pytest.approx(expected, rel=1e-6)


# ---- the sliding window ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_tokens,seq_len,last_n",
    [(203, 16, 4), (16, 16, 4), (17, 16, 4), (5, 16, 16), (100, 16, 16), (100, 12, 5), (2, 4, 1)],
)
def test_windows_score_every_target_exactly_once(n_tokens, seq_len, last_n):
    stream = np.concatenate([np.arange(n_tokens), np.zeros(seq_len + 1, dtype=np.int64)])
    starts = window_starts(n_tokens, seq_len, last_n)
    _, y, scored = window_batch(stream, n_tokens, starts, seq_len, last_n)
    scored_positions = np.sort(y[scored].numpy())  # stream[p] == p: targets name their own position
    np.testing.assert_array_equal(scored_positions, np.arange(1, n_tokens))
    assert scored[0, : min(seq_len, n_tokens - 1)].all()  # the first window scores all its real targets
    assert not scored[1:, : seq_len - last_n].any()  # later windows only their last last_n


def test_last_n_must_fit_the_window():
    with pytest.raises(UserError, match="last_n"):
        window_starts(100, 16, 17)
    with pytest.raises(UserError, match="last_n"):
        window_starts(100, 16, 0)


def one_window_at_a_time(model, tokens, seq_len, last_n, lengths):
    """The protocol written plainly: windows one by one, stride last_n, the first scoring every target."""
    nats, n, chars, nbytes, top1, top10 = 0.0, 0, 0, 0, 0, 0
    start = 0
    while True:
        window = tokens[start : start + seq_len + 1]
        x = torch.tensor(window[:-1], dtype=torch.int64)[None]
        y = torch.tensor(window[1:], dtype=torch.int64)
        with torch.no_grad():
            logits = model(x, None)[0][0]
        first = 0 if start == 0 else max(0, seq_len - last_n)
        for j in range(first, len(y)):
            logp = torch.log_softmax(logits[j].float(), -1)
            t = int(y[j])
            nats -= float(logp[t])
            rank = int((logp > logp[t]).sum())
            top1, top10, n = top1 + (rank == 0), top10 + (rank < 10), n + 1
            chars, nbytes = chars + int(lengths.chars[t]), nbytes + int(lengths.bytes[t])
        if start + seq_len >= len(tokens) - 1:
            return dict(nats=nats, n_tokens=n, n_chars=chars, n_bytes=nbytes, top1=top1, top10=top10)
        start += last_n


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_batched_windows_equal_one_window_at_a_time(batch_size):
    vocab, seq_len, last_n = 64, 16, 4
    model, lengths = tiny_gpt(vocab, seq_len), random_lengths(vocab)
    tokens = np.random.default_rng(0).integers(3, vocab, 123)
    ref = one_window_at_a_time(model, tokens, seq_len, last_n, lengths)

    sums = evaluate_sliding_window(
        model, tokens, seq_len, last_n, batch_size, NO_AUTOCAST, lengths, progress=False
    )
    nats, n_tokens, n_chars, n_bytes, top1, top10 = sums.tolist()
    assert (n_tokens, n_chars, n_bytes, top1, top10) == (
        ref["n_tokens"],
        ref["n_chars"],
        ref["n_bytes"],
        ref["top1"],
        ref["top10"],
    )
    assert n_tokens == len(tokens) - 1
    assert nats == pytest.approx(ref["nats"], rel=1e-9)


def test_ranks_split_the_windows_and_their_sums_add_up():
    model, lengths = tiny_gpt(), random_lengths(64)
    tokens = np.random.default_rng(1).integers(3, 64, 150)
    whole = evaluate_sliding_window(model, tokens, 16, 4, 8, NO_AUTOCAST, lengths, progress=False)
    parts = [
        evaluate_sliding_window(
            model, tokens, 16, 4, 8, NO_AUTOCAST, lengths, rank=r, world_size=2, progress=False
        )
        for r in range(2)
    ]
    assert parts[0][1] > 0 and parts[1][1] > 0
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-12, atol=0)


def test_padding_after_the_stream_is_never_scored():
    model, lengths = tiny_gpt(), random_lengths(64)
    tokens = np.random.default_rng(2).integers(3, 64, 37)  # the last window runs 11 tokens past the end
    sums = evaluate_sliding_window(model, tokens, 16, 4, 4, NO_AUTOCAST, lengths, progress=False)
    assert sums[1] == 36 and sums[2] == int(lengths.chars[torch.from_numpy(tokens[1:])].sum())


# ---- the stateful protocol ------------------------------------------------------------------------------


@pytest.mark.parametrize("n_tokens", [64, 67, 9])
def test_stateful_protocol_equals_one_long_forward(n_tokens):
    model, lengths = CumsumRNN(), random_lengths(32)
    tokens = np.random.default_rng(3).integers(3, 32, n_tokens)
    sums = evaluate_stateful(model, tokens, 16, 4, 8, NO_AUTOCAST, lengths, progress=False)
    assert set(model.calls) == {(1, 16)}  # one stream, chunks of seq_len (the last one padded)

    x, y = torch.from_numpy(tokens[:-1])[None], torch.from_numpy(tokens[1:])
    logits, _ = model(x, model.get_init_state(1, "cpu"))
    nats = F.cross_entropy(logits[0].float(), y, reduction="none").double().sum().item()
    assert sums[1] == n_tokens - 1 and sums[2] == int(lengths.chars[y].sum())
    assert sums[0].item() == pytest.approx(nats, rel=1e-6)


def test_stateful_protocol_runs_on_rank_zero_only():
    tokens = np.random.default_rng(4).integers(3, 32, 50)
    assert (
        evaluate_stateful(
            CumsumRNN(), tokens, 16, 4, 8, NO_AUTOCAST, rank=1, world_size=2, progress=False
        ).sum()
        == 0
    )


def test_too_short_split_is_a_clear_error():
    with pytest.raises(UserError, match="fewer than 2 tokens"):
        evaluate_sliding_window(tiny_gpt(), np.array([5]), 16, 4, 4, NO_AUTOCAST, progress=False)


def test_read_split_tokens_is_what_the_protocols_read(synthetic_corpus):
    _, dataset_path = synthetic_corpus
    tokens = read_split_tokens(dataset_path, "test")
    books = [n for _, n in read_books(dataset_path, "test")]
    assert len(tokens) == sum(books) + len(books) and tokens[-1] == 2


# ---- streamed and capped evaluation ---------------------------------------------------------------------


def one_stream_reference(model, tokens, seq_len, lengths):
    """The one-stream stateful loop as it was before streams existed: one row, chunks of seq_len."""
    stream = np.concatenate([tokens, np.zeros(seq_len + 1, dtype=tokens.dtype)])
    sums = torch.zeros(6, dtype=torch.float64)
    state = model.get_init_state(1, "cpu")
    for start in np.arange(0, len(tokens) - 1, seq_len, dtype=np.int64):
        x, y, scored = window_batch(stream, len(tokens), start[None], seq_len, seq_len)
        logits, state = model(x, state)
        sums += score_batch(logits, y, scored, lengths)
    return sums


@pytest.mark.parametrize("n_tokens", [64, 67, 9])
def test_one_stream_equals_the_previous_protocol_exactly(n_tokens):
    lengths = random_lengths(32)
    tokens = np.random.default_rng(5).integers(3, 32, n_tokens)
    new = evaluate_stateful(CumsumRNN(), tokens, 16, 4, 8, NO_AUTOCAST, lengths, progress=False, n_streams=1)
    assert torch.equal(new, one_stream_reference(CumsumRNN(), tokens, 16, lengths))


def loader_streams(dataset_path, split, n_streams, seq_len=8):
    """Each stream's tokens as the training loader reads them (repeat=False, one pass)."""
    loader = LanguiniDatasetIterator(dataset_path, split, n_streams, stream_indices(0, 1, n_streams), 1, seq_len,
                                     "cpu", repeat=False)  # fmt: skip
    rows = [[] for _ in range(n_streams)]
    for x, _, _ in loader:
        for i in range(n_streams):
            rows[i] += x[0, i].tolist()
    periods = loader._periods
    return [np.array(r[: int(p)]) for r, p in zip(rows, periods)]


@pytest.mark.parametrize("n_streams", [1, 2, 3, 5])
def test_streams_hold_the_books_the_training_loader_deals(synthetic_corpus, n_streams):
    _, dataset_path = synthetic_corpus
    tokens = read_split_tokens(dataset_path, "test")
    books = [n for _, n in read_books(dataset_path, "test")]
    ours = stream_rows(tokens, books, n_streams)
    theirs = loader_streams(dataset_path, "test", n_streams)
    assert len(ours) == n_streams
    for a, b in zip(ours, theirs):
        assert a.tolist() == b.tolist()


def test_capped_streams_are_a_prefix_of_the_books():
    tokens = np.arange(3, 3 + 10 + 1 + 6 + 1 + 4 + 1)  # books of 10, 6 and 4 tokens, each with its <D>
    rows = stream_rows(cap_tokens(tokens, 14), [10, 6, 4], 2)
    assert [r.tolist() for r in rows] == [tokens[:11].tolist(), tokens[11:14].tolist()]
    assert cap_tokens(tokens, 0) is tokens and len(cap_tokens(tokens, 1000)) == len(tokens)


def test_streams_batched_equal_each_stream_alone():
    lengths = random_lengths(32)
    book_lengths = [20, 7, 33, 12, 5]
    rng = np.random.default_rng(6)
    tokens = np.concatenate([np.append(rng.integers(3, 32, n), 2) for n in book_lengths])
    model = CumsumRNN()
    sums = evaluate_stateful(model, tokens, 8, 8, 1, NO_AUTOCAST, lengths, progress=False, n_streams=3,
                             book_lengths=book_lengths)  # fmt: skip
    assert set(model.calls) == {(3, 8)}  # three rows per chunk
    alone = sum(one_stream_reference(CumsumRNN(), s, 8, lengths) for s in stream_rows(tokens, book_lengths, 3))
    assert sums[1:].tolist() == alone[1:].tolist() and sums[1] == len(tokens) - 3
    assert sums[0].item() == pytest.approx(alone[0].item(), rel=1e-12)
    halves = [
        evaluate_stateful(CumsumRNN(), tokens, 8, 8, 1, NO_AUTOCAST, lengths, rank=r, world_size=2, progress=False,
                          n_streams=3, book_lengths=book_lengths)  # fmt: skip
        for r in (0, 1)
    ]
    assert (halves[0] + halves[1])[1:].tolist() == sums[1:].tolist()  # streams split across ranks


def test_more_streams_than_books_leaves_streams_empty():
    tokens = np.array([5, 6, 7, 2, 8, 9, 2])
    rows = stream_rows(tokens, [3, 2], 4)
    assert [len(r) for r in rows] == [4, 3, 0, 0]
    sums = evaluate_stateful(CumsumRNN(), tokens, 4, 4, 1, NO_AUTOCAST, progress=False, n_streams=4,
                             book_lengths=[3, 2])  # fmt: skip
    assert sums[1] == len(tokens) - 2
