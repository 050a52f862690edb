"""The optimisers: fused Adam == the for-loop Adam, Muon's parameter split, its CPU step, the schedule of both
optimisers, and Muon through the trainer (learning, checkpoints, exact resume)."""

import numpy as np
import pytest
import torch
from helpers import (
    exit_code,
    first_and_last_losses,
    nano_demo_args,
    pausing_trainer_command,
    preset_config,
    sigkill_once_paused,
    tiny_run_args,
    train_losses,
    write_bigram_corpus,
)
from torch import nn

from languini.common_lib.errors import UserError
from languini.projects import load_project
from languini.projects.gpt import main as gpt_main
from languini.train_lib.checkpoint import load_checkpoint
from languini.train_lib.loggers import read_metrics
from languini.train_lib.optim import (
    Muon,
    MuonWithAdam,
    build_optimizer,
    build_scheduler,
    hidden_matrices,
    lr_at_step,
    output_layer,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def tiny_config(project="gpt", **changes):
    """The tiny runs' model (1 layer, width 32, vocab 256) as a config."""
    cfg = preset_config(project)
    sizes = dict(n_layers=1, h_dim=32, head_dim=8, n_heads=2, mlp_dim=64, vocab_size=256, seq_len=16)
    for name, value in {**sizes, **changes}.items():
        setattr(cfg, name, value)
    return cfg


def tiny_model(project="gpt", **changes):
    cfg = tiny_config(project, **changes)
    torch.manual_seed(0)
    return load_project(project).Model(cfg), cfg


def run_main(argv) -> int:
    return exit_code(gpt_main.main, argv)


def set_grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 0.01


# ---- Adam --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_adam_matches_the_for_loop_adam(weight_decay):
    """The trainer's Adam (torch's fused kernel on CPU) makes the for-loop Adam's updates up to fp32 rounding."""
    model, cfg = tiny_model(weight_decay=weight_decay)
    reference = load_project("gpt").Model(cfg)
    reference.load_state_dict(model.state_dict())
    optimizer = build_optimizer(model, cfg)
    assert all(group["fused"] for group in optimizer.param_groups)
    kind = torch.optim.AdamW if weight_decay > 0 else torch.optim.Adam
    extra = {"weight_decay": weight_decay} if weight_decay > 0 else {}
    params = [{"params": [p for p in reference.parameters() if p.ndim >= 2]},
              {"params": [p for p in reference.parameters() if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
    loop = kind(params, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, foreach=False, **extra)
    for step in range(5):
        set_grads(model, step)
        set_grads(reference, step)
        optimizer.step()
        loop.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            assert (p - q).abs().max() <= 1e-6 * q.abs().max(), step


def test_weight_decay_shrinks_matrices_and_tables_not_biases_or_norm_gains():
    """With no gradient, an AdamW step shrinks each decayed weight by lr * weight_decay and leaves the rest."""
    model, cfg = tiny_model(weight_decay=0.5)
    optimizer = build_optimizer(model, cfg)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    decayed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert decayed == {name for name, p in model.named_parameters() if p.ndim >= 2}
    assert any("norm" in name or "ln" in name for name, p in model.named_parameters() if p.ndim < 2)
    for name in decayed:
        torch.testing.assert_close(dict(model.named_parameters())[name], before[name] * (1 - cfg.max_lr * 0.5))


def test_a_checkpoint_keeps_its_adam_kernel():
    """A run checkpointed with the for-loop Adam (the previous optimiser on a CPU) resumes with it: exact
    resume of older runs."""
    model, cfg = tiny_model()
    loop = torch.optim.Adam(model.parameters(), lr=cfg.max_lr, fused=False)
    set_grads(model, 0)
    loop.step()
    optimizer = build_optimizer(model, cfg)
    optimizer.load_state_dict(loop.state_dict())
    assert [(g["fused"], g["foreach"]) for g in optimizer.param_groups] == [(False, None)]  # None: the for-loop on CPU


# ---- which parameters Muon trains ----------------------------------------------------------------------------


def names_of(model, params):
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize(
    "project, changes, per_layer",
    [
        ("gpt", {}, ["attn.qkv.weight", "attn.out.weight", "mlp.fc.weight", "mlp.proj.weight"]),
        ("lstm", {}, ["rnn.gates.weight", "rnn.post_head.weight", "mlp.fc.weight", "mlp.proj.weight"]),
        ("lstm", {"non_quasi": True}, ["rnn.gates.weight", "rnn.post_head.weight", "mlp.fc.weight", "mlp.proj.weight"]),
    ],
)
def test_hidden_matrices_are_the_blocks_linear_weights(project, changes, per_layer):
    cfg = preset_config(project)
    for name, value in changes.items():
        setattr(cfg, name, value)
    model = load_project(project).Model(cfg)
    expected = {f"layers.{i}.{name}" for i in range(cfg.n_layers) for name in per_layer}
    assert names_of(model, hidden_matrices(model, cfg.vocab_size)) == expected
    assert output_layer(model, cfg.vocab_size) is model.linear
    # embeddings, the output layer, norms, biases and the classic LSTM's [heads, d, 4d] weights stay with Adam


def test_hidden_matrices_rule_knows_no_project():
    """Embedding tables (also when tied to the output) and the last vocab-sized Linear are not hidden matrices;
    a vocab-sized Linear earlier in the model is one."""
    vocab = 50
    model = nn.Sequential(nn.Embedding(vocab, 8), nn.Linear(8, vocab), nn.Linear(vocab, 8), nn.LayerNorm(8), nn.Linear(8, vocab))
    assert names_of(model, hidden_matrices(model, vocab)) == {"1.weight", "2.weight"}
    tied = nn.Sequential(nn.Embedding(vocab, 8), nn.Linear(8, 8), nn.Linear(8, vocab, bias=False))
    tied[2].weight = tied[0].weight
    assert names_of(tied, hidden_matrices(tied, vocab)) == {"1.weight"}
    bigram = nn.Sequential(nn.Embedding(vocab, 8), nn.Linear(8, vocab))
    cfg = tiny_config(optimizer="muon", vocab_size=vocab)
    with pytest.raises(UserError, match="no hidden weight matrices"):
        build_optimizer(bigram, cfg)


def test_muon_with_adam_splits_the_parameters():
    model, cfg = tiny_model(optimizer="muon")
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, MuonWithAdam) and isinstance(optimizer.muon, torch.optim.Muon)
    muon_params = [p for g in optimizer.muon.param_groups for p in g["params"]]
    adam_params = [p for g in optimizer.adam.param_groups for p in g["params"]]
    assert names_of(model, muon_params) == names_of(model, hidden_matrices(model, cfg.vocab_size))
    assert len(muon_params) + len(adam_params) == len(list(model.parameters()))
    group = optimizer.muon.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (cfg.muon_lr, 0.95, True, 0.0)
    assert group["adjust_lr_fn"] == "original"


# ---- Muon's CPU step -------------------------------------------------------------------------------------


def test_cpu_muon_step_is_torchs_muon_step():
    """With its Newton–Schulz iteration in bf16, the CPU step is torch.optim.Muon's, bit for bit; in fp32 (the
    CPU default) it differs only by that iteration's rounding."""
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 48), (24, 24)]
    for adjust in ("original", "match_rms_adamw"):
        start = [torch.randn(s) for s in shapes]
        runs = {}
        for name, dtype in (("torch", None), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
            params = [nn.Parameter(t.clone()) for t in start]
            cls = torch.optim.Muon if dtype is None else Muon
            optimizer = cls(params, lr=0.02, weight_decay=0.01, adjust_lr_fn=adjust)
            if dtype is not None:
                optimizer.cpu_dtype = dtype
            for step in range(3):
                gen = torch.Generator().manual_seed(step)
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                optimizer.step()
            runs[name] = params
        for p, q in zip(runs["torch"], runs["bf16"]):
            assert torch.equal(p, q)
        for t, p, r in zip(start, runs["torch"], runs["fp32"]):
            assert (r - p).norm() < 0.05 * (p - t).norm()  # the updates agree to bf16's precision


# ---- one schedule for both ---------------------------------------------------------------------------------


def test_schedule_drives_both_optimisers():
    """Adam's groups get exactly lr_at_step; Muon's the same curve times muon_lr / max_lr; the schedule's
    state round-trips through a state dict."""
    model, cfg = tiny_model(optimizer="muon", max_lr=3e-3, muon_lr=0.02, warmup_steps=5, decay_steps=30)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    for step in range(40):
        expected = lr_at_step(step, cfg.max_lr, cfg.min_lr, cfg.decay_steps, cfg.warmup_steps)
        assert [g["lr"] for g in optimizer.adam.param_groups] == [expected]
        assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(expected * 0.02 / 3e-3, rel=1e-12)
        assert scheduler.get_last_lr()[0] == expected  # the lr the trainer logs is Adam's
        if step == 20:
            saved = scheduler.state_dict()
        optimizer.step()
        scheduler.step()
    optimizer = build_optimizer(model, cfg)
    resumed = build_scheduler(optimizer, cfg)
    resumed.load_state_dict(saved)
    assert resumed.get_last_lr() == pytest.approx([lr_at_step(20, 3e-3, 6e-6, 30, 5) * f for f in (1, 0.02 / 3e-3)])


def test_grad_scaler_unscales_and_skips_both_optimisers():
    """fp16 training steps through a GradScaler: it unscales every group of both optimisers (a power-of-two
    scale: exactly), and an inf gradient skips the whole step."""
    model, cfg = tiny_model(optimizer="muon")
    reference = load_project("gpt").Model(cfg)
    reference.load_state_dict(model.state_dict())
    optimizer, plain = build_optimizer(model, cfg), build_optimizer(reference, cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    tokens = torch.randint(3, cfg.vocab_size, (4, cfg.seq_len + 1), generator=torch.Generator().manual_seed(0))

    def loss_of(m):
        logits, _ = m(tokens[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    scaler.scale(loss_of(model)).backward()
    loss_of(reference).backward()
    scaler.step(optimizer)
    scaler.update()
    plain.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    optimizer.zero_grad()
    scaler.scale(loss_of(model)).backward()
    optimizer.muon.param_groups[0]["params"][0].grad.fill_(float("inf"))
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(optimizer)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


# ---- through the trainer ---------------------------------------------------------------------------------


def test_muon_trains_a_tiny_gpt(tmp_path):
    data_root = tmp_path / "bigram"
    write_bigram_corpus(data_root)
    run_dir = tmp_path / "run"
    assert run_main(tiny_run_args("gpt", data_root, run_dir, 20, "--optimizer", "muon", "--max_lr", "1e-2")) == 0
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 21)) and np.isfinite(list(losses.values())).all()
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (18, 19, 20)])
    assert last < first - 1.0, (first, last)
    checkpoint = load_checkpoint(str(run_dir / "checkpoints" / "latest.pt"))
    assert set(checkpoint["optimizer"]) == {"adam", "muon"} and set(checkpoint["scheduler"]) == {"adam", "muon"}
    assert len(checkpoint["optimizer"]["muon"]["state"]) == 4  # momentum of the 1-layer block's 4 matrices


def test_muon_resume_after_sigkill_is_bit_identical(synthetic_corpus, tmp_path):
    data_root, _ = synthetic_corpus
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    muon = ("--optimizer", "muon")
    assert run_main(tiny_run_args("gpt", data_root, straight, 20, *muon)) == 0

    # 10 steps checkpointed, 13 logged, then killed mid-step 14: not a clean exit
    args = tiny_run_args("gpt", data_root, killed, 20, "--log_ckpt_every", "10", *muon)
    sigkill_once_paused(pausing_trainer_command("gpt", 14, args))
    assert max(train_losses(killed)) == 13
    assert load_checkpoint(str(killed / "checkpoints" / "latest.pt"))["step"] == 10

    assert run_main(args + ["--resume", "auto", "--optimizer", "adam"]) == 2  # another recipe: refused
    assert run_main(args + ["--resume", "auto"]) == 0
    resumed, expected = train_losses(killed), train_losses(straight)
    assert sorted(resumed) == list(range(1, 21))
    assert resumed == expected  # bit-identical, not approximately equal


def test_bad_optimizer_settings_are_one_line(tmp_path, capsys):
    for flags, words in (
        (["--optimizer", "sgd"], "adam, muon"),
        (["--optimizer", "muon", "--muon_lr", "0"], "--muon_lr"),
        (["--muon_momentum", "1"], "--muon_momentum"),
    ):
        assert run_main(tiny_run_args("gpt", tmp_path / "data", tmp_path / "run", 2, *flags)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_nano_with_muon_learns_the_demo_corpus(tmp_path, demo_data_root):
    """GPT nano with Muon on the demo corpus: the loss drops clearly within 100 steps, validation included."""
    run_dir = tmp_path / "run"
    assert run_main(nano_demo_args(demo_data_root, run_dir, "--optimizer", "muon")) == 0
    first, last = first_and_last_losses(run_dir)
    assert last < first - 2.0, (first, last)
    final = read_metrics(run_dir)[-1]
    assert final["eval/loss"] < first - 1.5 and final["eval/normalised_ppl"] < 20
