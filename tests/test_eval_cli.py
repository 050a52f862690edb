"""Token lengths from a real SentencePiece model, and each project's eval.py end to end on fabricated runs."""

import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import sentencepiece as spm
import torch
from helpers import REPO_ROOT, make_synthetic_corpus, output_tail, torchrun

from languini.common_lib.atomic_io import atomic_torch_save
from languini.common_lib.config import apply_overrides, save_config
from languini.common_lib.errors import UserError
from languini.dataset_lib.languini_books import read_split_tokens
from languini.projects import load_project
from languini.projects.gpt import eval as gpt_eval
from languini.tools import launch
from languini.train_lib.token_lengths import load_token_lengths, token_lengths_from_processor

RESULT_KEYS = {
    "split",
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
    "last_n",
    "protocol",
    "checkpoint_step",
}
TINY_MODEL = dict(n_layers=1, h_dim=32, mlp_dim=64, head_dim=8, n_heads=4)


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> str:
    """A real SentencePiece BPE model (vocab 300, the Languini settings) trained on a few KB of text."""
    rng = random.Random(0)
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "and",
        "said",
        "café",
        "naïve",
        "Zoë",
        "über",
        "—",
        "日本",
        "42",
        "1999",
        "  ",
        "\t",
        "hello,",
        "world.",
    ]
    lines = [" ".join(rng.choice(words) for _ in range(14)) for _ in range(400)]
    path = str(tmp_path_factory.mktemp("spm") / "tokenizer.model")
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=f, vocab_size=300, model_type="bpe", byte_fallback=True,
            split_digits=True, split_by_number=True, split_by_whitespace=True, split_by_unicode_script=True,
            allow_whitespace_only_pieces=True, max_sentencepiece_length=99, normalization_rule_name="identity",
            add_dummy_prefix=False, remove_extra_whitespaces=False, character_coverage=0.9995, pad_id=0, unk_id=1,
            bos_id=-1, eos_id=-1, user_defined_symbols=["<D>"], minloglevel=2,
        )  # fmt: skip
    return path


# ---- token lengths --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        " the cat sat on a mat",
        "Zoë said: café — 日本 1999\n",
        "жук €5 🙂 x",
        "  \t tabs  and   spaces ",
        "über",
    ],
)
def test_token_lengths_sum_to_the_decoded_text(tokenizer_model, text):
    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    lengths = token_lengths_from_processor(sp)
    ids = sp.encode(text)
    assert sp.decode(ids) == text  # identity normalisation, no dummy prefix: decoding is lossless
    ids_t = torch.tensor(ids)
    assert int(lengths.chars[ids_t].sum()) == len(text)
    assert int(lengths.bytes[ids_t].sum()) == len(text.encode("utf-8"))


def test_byte_fallback_pieces_count_one_character_per_utf8_sequence(tokenizer_model):
    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    lengths = token_lengths_from_processor(sp)
    ids = sp.encode("жж")  # unseen in training: four byte pieces <0xD0><0xB6><0xD0><0xB6>
    assert all(sp.is_byte(i) for i in ids) and len(ids) == 4
    assert lengths.chars[torch.tensor(ids)].tolist() == [1, 0, 1, 0]
    assert lengths.bytes[torch.tensor(ids)].tolist() == [1, 1, 1, 1]


def test_end_of_document_counts_three_characters_and_padding_none(tokenizer_model):
    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    lengths = token_lengths_from_processor(sp)
    assert sp.id_to_piece(2) == "<D>" and sp.decode([2]) == "<D>"
    assert (lengths.chars[2], lengths.bytes[2]) == (3, 3)
    assert (lengths.chars[0], lengths.bytes[0]) == (0, 0)
    ids = [2] + sp.encode("the cat") + [2, 0, 0]  # a stream piece as the loader gives it, padded at the end
    assert int(lengths.chars[torch.tensor(ids)].sum()) == len(sp.decode(ids)) == len("<D>the cat<D>")


def test_load_token_lengths_from_a_dataset_folder(tokenizer_model, tmp_path):
    assert load_token_lengths(str(tmp_path)) is None  # no tokenizer.model: token metrics only
    shutil.copy(tokenizer_model, tmp_path / "tokenizer.model")
    assert load_token_lengths(str(tmp_path), 300).chars.shape == (300,)
    with pytest.raises(UserError, match="300 tokens but the config has --vocab_size 256"):
        load_token_lengths(str(tmp_path), 256)


# ---- eval.py end to end ---------------------------------------------------------------------------------


def fabricate_run(run_dir, data_root, project, **overrides) -> str:
    """A run folder as the trainer leaves it: config.json and checkpoints/latest.pt of a fresh tiny model."""
    fields = dict(
        data_root=data_root,
        dataset="synth_256",
        vocab_size=256,
        seq_len=16,
        last_n=4,
        test_batch_size=8,
        device="cpu",
        precision="auto",
        **TINY_MODEL,
    )
    spec = load_project(project)
    cfg = apply_overrides(spec.preset_config("nano"), {**fields, **overrides})
    save_config(cfg, os.path.join(run_dir, "config.json"))
    torch.manual_seed(0)
    atomic_torch_save(
        os.path.join(run_dir, "checkpoints", "latest.pt"), {"model": spec.Model(cfg).state_dict(), "step": 7}
    )
    return str(run_dir)


def read_result(run_dir, split="test") -> dict:
    with open(os.path.join(run_dir, "eval", f"{split}.json")) as f:
        return json.load(f)


def test_gpt_eval_writes_the_results_of_the_run(synthetic_corpus, tmp_path, capsys):
    data_root, dataset_path = synthetic_corpus
    run_dir = fabricate_run(tmp_path / "run", data_root, "gpt")

    assert gpt_eval.main(["--run_dir", run_dir]) == 0

    result = read_result(run_dir)
    assert RESULT_KEYS <= set(result)
    assert result["n_tokens"] == len(read_split_tokens(dataset_path, "test")) - 1
    assert (result["split"], result["protocol"], result["last_n"], result["checkpoint_step"]) == (
        "test",
        "sliding_window",
        4,
        7,
    )
    assert abs(result["loss"] - math.log(256)) < 0.5  # a fresh model is close to uniform
    assert result["normalised_ppl"] is None  # the synthetic corpus has no tokenizer
    out = capsys.readouterr().out
    assert "normalised_ppl" in out and "no tokenizer.model" in out


def test_gpt_eval_all_splits_with_character_metrics(tokenizer_model, tmp_path):
    data_root = str(tmp_path / "data")
    dataset_path = make_synthetic_corpus(
        data_root, dataset="synth_300", vocab_size=300, splits={"train": [50], "test": [90, 40], "java": [70]}
    )
    shutil.copy(tokenizer_model, os.path.join(dataset_path, "tokenizer.model"))
    run_dir = fabricate_run(
        tmp_path / "run", data_root, "gpt", dataset="synth_300", vocab_size=300
    )

    assert (
        launch.eval_main(["gpt", "--run_dir", run_dir, "--eval_data_split", "all", "--test_batch_size", "3"])
        == 0
    )

    lengths = load_token_lengths(dataset_path)
    for split in ("test", "java"):
        result = read_result(run_dir, split)
        targets = torch.from_numpy(read_split_tokens(dataset_path, split)[1:])
        assert result["n_tokens"] == len(targets)
        assert result["n_chars"] == int(lengths.chars[targets].sum())
        assert result["n_bytes"] == int(lengths.bytes[targets].sum())
        nats = result["loss"] * result["n_tokens"]
        assert result["normalised_ppl"] == pytest.approx(math.exp(nats / result["n_chars"]), rel=1e-9)
        assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / result["n_bytes"], rel=1e-9)


def test_eval_from_checkpoint_and_config_writes_next_to_the_config(synthetic_corpus, tmp_path):
    run_dir = fabricate_run(tmp_path / "run", synthetic_corpus[0], "gpt")
    ckpt = os.path.join(run_dir, "checkpoints", "latest.pt")
    assert (
        gpt_eval.main(
            ["--checkpoint", ckpt, "--config", os.path.join(run_dir, "config.json"), "--last_n", "16"]
        )
        == 0
    )
    assert read_result(run_dir)["last_n"] == 16


def test_lstm_eval_carries_the_state_through_the_split(synthetic_corpus, tmp_path):
    from languini.projects.lstm import eval as lstm_eval

    data_root, dataset_path = synthetic_corpus
    run_dir = fabricate_run(tmp_path / "run", data_root, "lstm", block_length=8)
    assert lstm_eval.main(["--run_dir", run_dir]) == 0
    result = read_result(run_dir)
    assert (result["protocol"], result["last_n"]) == ("stateful", None)
    assert result["n_tokens"] == len(read_split_tokens(dataset_path, "test")) - 1


def run_main_expecting_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        gpt_eval.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_clear_errors(synthetic_corpus, tmp_path, capsys):
    assert "no run folder at" in run_main_expecting_error(["--run_dir", str(tmp_path / "nope")], capsys)
    assert "pass --run_dir DIR" in run_main_expecting_error([], capsys)

    run_dir = fabricate_run(tmp_path / "run", synthetic_corpus[0], "gpt")
    err = run_main_expecting_error(["--run_dir", run_dir, "--eval_data_split", "tset"], capsys)
    assert "split 'tset' not found" in err and "test" in err
    assert "unknown flag '--lats_n'" in run_main_expecting_error(
        ["--run_dir", run_dir, "--lats_n", "3"], capsys
    )
    assert "does not fit the config" in run_main_expecting_error(
        ["--run_dir", run_dir, "--h_dim", "48"], capsys
    )
    assert "last_n" in run_main_expecting_error(["--run_dir", run_dir, "--last_n", "17"], capsys)

    os.remove(os.path.join(run_dir, "checkpoints", "latest.pt"))
    assert "no checkpoint at" in run_main_expecting_error(["--run_dir", run_dir], capsys)
    with pytest.raises(SystemExit):
        launch.eval_main(["gtp", "--run_dir", run_dir])
    assert "unknown project 'gtp'" in capsys.readouterr().err


def test_two_process_eval_sums_the_counts_of_both_ranks(synthetic_corpus, tmp_path):
    data_root, _ = synthetic_corpus
    single = fabricate_run(tmp_path / "single", data_root, "gpt")
    double = fabricate_run(tmp_path / "double", data_root, "gpt")
    assert gpt_eval.main(["--run_dir", single, "--test_batch_size", "4"]) == 0
    eval_py = os.path.join(REPO_ROOT, "languini", "projects", "gpt", "eval.py")
    proc = torchrun(eval_py, ["--run_dir", double, "--test_batch_size", "4"])
    assert proc.returncode == 0, output_tail(proc)
    one, two = read_result(single), read_result(double)
    assert two["n_tokens"] == one["n_tokens"] and two["top1"] == one["top1"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-9)
    assert np.isclose(two["ppl"], one["ppl"], rtol=1e-9)


# ---- capped and streamed evaluation ---------------------------------------------------------------------


def test_capped_eval_records_the_cap_and_stays_within_it(synthetic_corpus, tmp_path):
    data_root, dataset_path = synthetic_corpus
    run_dir = fabricate_run(tmp_path / "run", data_root, "gpt")
    assert gpt_eval.main(["--run_dir", run_dir]) == 0
    full = read_result(run_dir)
    assert (full["max_tokens"], full["eval_streams"]) == (0, 1)

    assert gpt_eval.main(["--run_dir", run_dir, "--max_tokens", "100"]) == 0
    capped = read_result(run_dir)
    assert capped["max_tokens"] == 100 and capped["n_tokens"] == 99 <= 100

    split_size = len(read_split_tokens(dataset_path, "test"))
    assert gpt_eval.main(["--run_dir", run_dir, "--max_tokens", str(split_size)]) == 0
    whole = read_result(run_dir)
    metrics = ("n_tokens", "loss", "top1", "top10")
    assert [whole[k] for k in metrics] == [full[k] for k in metrics] and whole["max_tokens"] == split_size


@pytest.mark.parametrize("project, extra", [("gpt", []), ("lstm", ["--eval_streams", "2"])])
def test_capped_eval_equals_a_split_truncated_to_those_books(tmp_path, project, extra):
    """The first two books of the test split (151 + 261 tokens with their <D>) as a cap, and as a split."""
    from languini.projects.lstm import eval as lstm_eval

    main = {"gpt": gpt_eval.main, "lstm": lstm_eval.main}[project]
    train = [300, 120, 500, 260, 410, 90, 330, 200]
    whole_root, short_root = str(tmp_path / "whole"), str(tmp_path / "short")
    make_synthetic_corpus(whole_root, splits={"train": train, "test": [150, 260, 90]})
    make_synthetic_corpus(short_root, splits={"train": train, "test": [150, 260]})
    model = {"block_length": 8} if project == "lstm" else {}
    capped = fabricate_run(tmp_path / "capped", whole_root, project, **model)
    short = fabricate_run(tmp_path / "short_run", short_root, project, **model)
    assert main(["--run_dir", capped, "--max_tokens", str(151 + 261), *extra]) == 0
    assert main(["--run_dir", short, *extra]) == 0
    a, b = read_result(capped), read_result(short)
    for key in ("n_tokens", "loss", "top1", "top10"):
        assert a[key] == b[key], key


def test_lstm_one_stream_is_the_default_and_streams_are_recorded(synthetic_corpus, tmp_path):
    from languini.projects.lstm import eval as lstm_eval

    data_root, dataset_path = synthetic_corpus
    run_dir = fabricate_run(tmp_path / "run", data_root, "lstm", block_length=8)
    assert lstm_eval.main(["--run_dir", run_dir]) == 0
    default = read_result(run_dir)
    assert lstm_eval.main(["--run_dir", run_dir, "--eval_streams", "1"]) == 0
    one = read_result(run_dir)
    metrics = ("n_tokens", "loss", "top1", "top10")
    assert [one[k] for k in metrics] == [default[k] for k in metrics]  # exactly the same numbers
    assert lstm_eval.main(["--run_dir", run_dir, "--eval_streams", "3"]) == 0
    three = read_result(run_dir)
    assert (three["eval_streams"], three["state_resets"]) == (3, "at the start of each stream")
    assert three["n_tokens"] == len(read_split_tokens(dataset_path, "test")) - 3  # one first token per stream
    assert abs(three["loss"] - default["loss"]) < 0.1


def test_stream_and_cap_mistakes_are_one_line(synthetic_corpus, tmp_path, capsys):
    run_dir = fabricate_run(tmp_path / "run", synthetic_corpus[0], "gpt")
    err = run_main_expecting_error(["--run_dir", run_dir, "--eval_streams", "4"], capsys)
    assert "--eval_streams applies to stateful models only" in err and err.count("\n") == 1
    assert "--max_tokens must be 0" in run_main_expecting_error(["--run_dir", run_dir, "--max_tokens", "-5"], capsys)
    assert "--max_tokens 1 leaves no target" in run_main_expecting_error(
        ["--run_dir", run_dir, "--max_tokens", "1"], capsys
    )
