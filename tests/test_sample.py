"""`languini sample`: prompt continuation for GPT (windowed context) and LSTM (carried state) on fabricated runs.

A fabricated "successor" model knows one mapping: its blocks are zeroed, so the logits at a position depend
only on that position's token, and the output layer is built so that the most likely next token of v is
succ(v), a fixed cycle through the tokenizer's word pieces. Greedy sampling must then print exactly the
prompt followed by succ(last), succ(succ(last)), ...
"""

import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F
from helpers import exit_code

from languini import cli as languini_cli
from languini.common_lib.atomic_io import atomic_torch_save
from languini.common_lib.config import apply_overrides, save_config
from languini.dataset_lib.layout import END_OF_DOC
from languini.dataset_lib.tokenizer_model import load_processor, train_tokenizer
from languini.projects import load_project
from languini.tools import sample

VOCAB = 300
TINY = {
    "gpt": dict(n_layers=1, h_dim=32, mlp_dim=64, head_dim=8, n_heads=4, seq_len=16),
    "lstm": dict(n_layers=1, h_dim=32, mlp_dim=64, head_dim=8, n_heads=4, seq_len=10, block_length=4),
}
PROMPT = "the king spoke of war and peace"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    """A SentencePiece model with the Languini settings, trained on a few KB of text (about a second)."""
    rng = random.Random(0)
    words = ["the", "king", "queen", "spoke", "of", "war", "and", "peace", "night", "day", "crown", "river"]
    books = ["\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(60)) for _ in range(5)]
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(train_tokenizer(books, VOCAB))
    return str(path)


def successor_cycle(sp) -> dict[int, int]:
    """succ: a fixed cycle through the word pieces (no special, byte or unknown pieces)."""
    words = [i for i in range(END_OF_DOC + 1, sp.get_piece_size()) if not (sp.is_byte(i) or sp.is_unknown(i))]
    order = random.Random(1).sample(words, len(words))
    return {v: order[(k + 1) % len(order)] for k, v in enumerate(order)}


def make_successor_model(model, succ: dict[int, int]):
    """Zero the blocks (residuals pass the embedding through), then aim each output row u at pred(u)."""
    h_dim = model.c.h_dim
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("layers."):
                param.zero_()
        if hasattr(model, "position_embedding"):
            model.position_embedding.weight.zero_()
        emb = torch.randn(model.c.vocab_size, h_dim, generator=torch.Generator().manual_seed(2))
        model.input_embedding.weight.copy_(emb)
        seen = F.layer_norm(emb * math.sqrt(h_dim), (h_dim,))  # what the output layer sees for each token
        weight = torch.zeros_like(model.linear.weight)
        for v, u in succ.items():
            weight[u] = seen[v]
        model.linear.weight.copy_(weight)


def fabricate_run(tmp_path, project, tokenizer, succ=None) -> str:
    """A run folder as the trainer leaves it (config.json, checkpoints/latest.pt), its dataset's tokenizer."""
    data_root = tmp_path / "data"
    (data_root / f"synth_{VOCAB}").mkdir(parents=True)
    (data_root / f"synth_{VOCAB}" / "tokenizer.model").write_bytes(open(tokenizer, "rb").read())
    spec = load_project(project)
    cfg = apply_overrides(spec.preset_config("nano"), {
        **TINY[project], "data_root": str(data_root), "dataset": f"synth_{VOCAB}", "vocab_size": VOCAB, "device": "cpu"})
    run_dir = tmp_path / "run"
    save_config(cfg, str(run_dir / "config.json"))
    torch.manual_seed(0)
    model = spec.Model(cfg)
    if succ is not None:
        make_successor_model(model, succ)
    atomic_torch_save(str(run_dir / "checkpoints" / "latest.pt"), {"model": model.state_dict(), "step": 7})
    return str(run_dir)


def run_sample(capsys, *argv) -> str:
    assert sample.main(list(argv)) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("project", ["gpt", "lstm"])
def test_greedy_output_is_the_prompt_then_the_known_continuation(project, tokenizer, tmp_path, capsys, one_thread):
    sp = load_processor(tokenizer)
    succ = successor_cycle(sp)
    run_dir = fabricate_run(tmp_path, project, tokenizer, succ)
    out = run_sample(capsys, "--run_dir", run_dir, "--prompt", PROMPT, "--max_new_tokens", "25",
                     "--temperature", "0", "--device", "cpu")
    expected, token = [], sp.encode(PROMPT)[-1]
    for _ in range(25):
        token = succ[token]
        expected.append(token)
    assert out == PROMPT + sp.decode(expected) + "\n"


@pytest.mark.parametrize("project", ["gpt", "lstm"])
def test_same_seed_same_text_and_another_seed_other_text(project, tokenizer, tmp_path, capsys, one_thread):
    run_dir = fabricate_run(tmp_path, project, tokenizer)  # a fresh model: close to uniform, so draws vary
    argv = ["--run_dir", run_dir, "--prompt", PROMPT, "--max_new_tokens", "20", "--top_k", "50"]
    first = run_sample(capsys, *argv, "--seed", "3")
    assert first.startswith(PROMPT) and len(first) > len(PROMPT) + 1
    assert run_sample(capsys, *argv, "--seed", "3") == first
    assert run_sample(capsys, *argv, "--seed", "4") != first


class Recorder(torch.nn.Module):
    """The model, recording the token ids of every forward call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def get_init_state(self, batch_size, device):
        return self.model.get_init_state(batch_size, device)

    def forward(self, x, state):
        self.inputs.append(x[0].tolist())
        return self.model(x, state)


def _model(project, seed=0):
    spec = load_project(project)
    cfg = apply_overrides(spec.preset_config("nano"), {**TINY[project], "vocab_size": VOCAB})
    torch.manual_seed(seed)
    return spec.Model(cfg).eval(), cfg


def test_gpt_feeds_the_prompt_and_windows_the_last_seq_len_tokens(one_thread):
    model, cfg = _model("gpt")
    recorder = Recorder(model)
    prompt = [END_OF_DOC] + list(range(10, 10 + 2 * cfg.seq_len))  # longer than the window
    seen = []
    new = sample.generate(recorder, False, prompt, 5, cfg.seq_len, lambda logits: int(logits.argmax()), seen.append)
    assert len(new) == 5 and seen == new
    assert recorder.inputs[0] == prompt[-cfg.seq_len :]
    assert all(len(x) == cfg.seq_len for x in recorder.inputs)
    assert recorder.inputs[-1] == (prompt + new[:-1])[-cfg.seq_len :]


def test_lstm_reads_the_prompt_once_then_one_token_per_step_with_the_state(one_thread):
    model, cfg = _model("lstm")
    recorder = Recorder(model)
    prompt = [END_OF_DOC] + list(range(10, 35))  # 26 tokens: chunks of seq_len 10, 10, 6
    greedy = lambda logits: int(logits.argmax())  # noqa: E731
    new = sample.generate(recorder, True, prompt, 6, cfg.seq_len, greedy)
    assert [len(x) for x in recorder.inputs] == [10, 10, 6, 1, 1, 1, 1, 1]
    assert sum(recorder.inputs[:3], []) == prompt and sum(recorder.inputs[3:], []) == new[:-1]
    # the carried state gives what reading the whole text from a zero state each time gives
    assert sample.generate(model, False, prompt, 6, 10_000, greedy) == new


def test_pick_token_temperature_zero_and_top_k():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    generator = torch.Generator().manual_seed(0)
    assert sample.pick_token(logits, 0, 0, generator) == 1
    assert {sample.pick_token(logits, 1.0, 2, generator) for _ in range(200)} == {1, 3}


def test_stream_holds_back_an_incomplete_character(tokenizer):
    sp = load_processor(tokenizer)
    ids = sp.encode("day é night")  # é is unseen in training: two byte-fallback pieces

    class Out:
        def __init__(self):
            self.parts = []

        def write(self, text):
            self.parts.append(text)

        def flush(self):
            pass

    out = Out()
    stream = sample.TextStream(sp, out)
    for token in ids:
        stream.add(token)
    assert stream.finish() == "day é night" == "".join(out.parts)
    assert all("\ufffd" not in part for part in out.parts)


def test_mistakes_are_one_line(tokenizer, tmp_path, capsys):
    run_dir = fabricate_run(tmp_path, "gpt", tokenizer)
    cases = [
        (["--run_dir", str(tmp_path / "nowhere"), "--prompt", "x"], "no run folder"),
        (["--run_dir", run_dir, "--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["--run_dir", run_dir, "--prompt", "x", "--max_new", "3"], "unrecognized arguments"),
        (["--run_dir", run_dir], "required: --prompt"),
        (["--run_dir", run_dir, "--prompt", "x", "--checkpoint", str(tmp_path / "none.pt")], "no checkpoint"),
        (["--run_dir", run_dir, "--prompt", "x", "--tokenizer", str(tmp_path / "none.model")], "no tokenizer"),
    ]
    for argv, message in cases:
        assert exit_code(sample.main, argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    config["project"] = ""
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f)
    assert exit_code(sample.main, ["--run_dir", run_dir, "--prompt", "x"]) == 2
    assert "names no project" in capsys.readouterr().err


def test_languini_sample_is_a_command(capsys):
    assert exit_code(languini_cli.main, ["sample", "--help"]) == 0
    assert "--max_new_tokens" in capsys.readouterr().out
