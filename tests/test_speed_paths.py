"""The GPU speed paths, checked on CPU: chunked cross-entropy, per-block compile, bf16 autocast, and the
precision and compile choices made for a GPU.

Each optimisation must leave the model's mathematics alone: same loss and gradients as the fp32
reference within fp32 tolerance (cross-entropy), bf16 noise (autocast) or 1e-4 (torch.compile).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import exit_code, preset_config, train_losses
from torch.profiler import ProfilerActivity, profile

from languini.common_lib import device as device_module
from languini.common_lib.config import apply_overrides
from languini.projects.gpt import main as gpt_main
from languini.projects.gpt.model import Model as GPT
from languini.train_lib import compile as compile_module
from languini.train_lib import loss as loss_module
from languini.train_lib.checkpoint import load_model_weights
from languini.train_lib.compile import compile_loss, compile_model
from languini.train_lib.loss import lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _reference(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_cross_entropy_matches_the_fp32_reference(monkeypatch, dtype):
    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", 64)  # 300 tokens: 4 full chunks and a ragged one
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 100, 512)).to(dtype).requires_grad_()
    targets = torch.randint(0, 512, (3, 100))
    loss = lm_loss(logits, targets)
    (grad,) = torch.autograd.grad(0.37 * loss, logits)
    expected = _reference(logits, targets)
    (expected_grad,) = torch.autograd.grad(0.37 * expected, logits)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert grad.dtype == dtype
    # The same fp32 gradient rounded once to the logits' dtype: at most one ulp apart, rarely different.
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=2 ** -7, atol=1e-7)  # atol: fp16 subnormals
    assert (grad != expected_grad).float().mean() < 1e-3


def test_fp32_logits_take_the_plain_cross_entropy_bit_for_bit():
    torch.manual_seed(0)
    logits = torch.randn(2, 50, 64, requires_grad=True)
    targets = torch.randint(0, 64, (2, 50))
    (grad,) = torch.autograd.grad(lm_loss(logits, targets), logits)
    (expected_grad,) = torch.autograd.grad(_reference(logits, targets), logits)
    assert torch.equal(lm_loss(logits, targets), _reference(logits, targets))
    assert torch.equal(grad, expected_grad)


def _peak_allocated_bytes(fn) -> int:
    """Peak of live CPU tensor memory while `fn` runs, from the profiler's allocation and free events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_chunked_cross_entropy_keeps_no_fp32_copy_of_the_logits(monkeypatch):
    """bf16 logits of 2 MiB: the plain loss peaks near 5x that (fp32 copy, log-softmax, its gradient),
    the chunked one near 2x (the logits and their bf16 gradient)."""
    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", 64)
    torch.manual_seed(0)
    hidden, weight = torch.randn(1024, 32), (0.1 * torch.randn(1024, 32)).requires_grad_()
    targets = torch.randint(0, 1024, (1024,))
    logits_bytes = 1024 * 1024 * 2

    def step(loss_fn):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = hidden @ weight.t()
            loss_fn(logits, targets).backward()

        return run

    plain, chunked = _peak_allocated_bytes(step(_reference)), _peak_allocated_bytes(step(lm_loss))
    assert plain > 4 * logits_bytes, plain
    assert chunked < 2.5 * logits_bytes, chunked


def _tiny_gpt(n_layers=2):
    fields = dict(n_layers=n_layers, h_dim=32, mlp_dim=64, head_dim=8, n_heads=4, vocab_size=64, seq_len=16)
    return GPT(apply_overrides(preset_config("gpt", "nano"), fields))


def test_compile_model_compiles_each_block_in_place(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, **kwargs: compiled.append((module, kwargs)))
    model = _tiny_gpt()
    assert compile_model(model, "none") is model and compiled == []
    names = list(model.state_dict())
    assert compile_model(model, "default") is model
    assert [m for m, _ in compiled] == list(model.layers)  # each block in place, not the whole model
    assert list(model.state_dict()) == names

    compiled.clear()
    linear = torch.nn.Linear(4, 4)
    assert compile_model(linear, "default") is linear and [m for m, _ in compiled] == [linear]  # no `layers`: whole
    assert compile_loss("none") is lm_loss
    with pytest.raises(ValueError, match="unknown compile mode"):
        compile_model(_tiny_gpt(), "fastest")


def _gpt_args(data_root, run_dir, steps, *extra):
    """GPT 2 x 64 on the vocab-256 synthetic corpus, seq_len 32, batch 8, loss logged every step."""
    return [
        "nano", "--data_root", str(data_root), "--dataset", "synth_256", "--vocab_size", "256",
        "--n_layers", "2", "--h_dim", "64", "--head_dim", "16", "--n_heads", "4", "--mlp_dim", "256",
        "--seq_len", "32", "--train_batch_size", "8", "--max_train_steps", str(steps), "--decay_steps", "100",
        "--warmup_steps", "5", "--max_lr", "3e-3", "--log_metrics_every", "1", "--log_terminal_every", "1000",
        "--log_grads_every", "0", "--log_ckpt_every", "1000", "--eval_every", "0", "--logger_type", "none",
        "--no-progress_bar", "--device", "cpu", "--run_dir", str(run_dir), *extra,
    ]  # fmt: skip


def _curve(data_root, run_dir, steps, *extra) -> np.ndarray:
    assert exit_code(gpt_main.main, _gpt_args(data_root, run_dir, steps, *extra)) == 0
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, steps + 1))
    return np.array([losses[s] for s in sorted(losses)])


def test_bf16_autocast_keeps_the_fp32_loss_curve(synthetic_corpus, tmp_path):
    """30 steps: bf16 autocast (chunked loss included) stays within 1e-2 of fp32 at every step.

    1e-2 is a third of the spacing of bf16 numbers near the loss (2^-5 = 0.031 on [4, 8)), and a third of
    the mean loss drop per step here (about 0.035): the curves agree more closely than bf16 can write the
    loss itself, yet a wrong upcast or a lost update would exceed it within a few steps.
    """
    data_root, _ = synthetic_corpus
    fp32 = _curve(data_root, tmp_path / "fp32", 30)
    bf16 = _curve(data_root, tmp_path / "bf16", 30, "--precision", "bf16")
    assert np.abs(bf16 - fp32).max() < 1e-2, np.abs(bf16 - fp32).max()
    assert not np.array_equal(bf16, fp32)  # autocast really ran in bf16
    for curve in (fp32, bf16):
        assert curve[-5:].mean() < curve[:5].mean() - 0.5, curve


def test_compiled_training_matches_eager_and_checkpoints_load_eagerly(synthetic_corpus, tmp_path):
    data_root, _ = synthetic_corpus
    eager = _curve(data_root, tmp_path / "eager", 5)
    compiled = _curve(data_root, tmp_path / "compiled", 5, "--compile", "default")
    assert np.abs(compiled - eager).max() < 1e-4, compiled - eager

    fields = dict(n_layers=2, h_dim=64, mlp_dim=256, head_dim=16, n_heads=4, vocab_size=256, seq_len=32)
    cfg = apply_overrides(preset_config("gpt", "nano"), fields)
    model = GPT(cfg)
    load_model_weights(model, str(tmp_path / "compiled" / "checkpoints" / "latest.pt"))  # strict names
    reference = GPT(cfg)
    load_model_weights(reference, str(tmp_path / "eager" / "checkpoints" / "latest.pt"))
    x = torch.randint(0, 256, (2, 32))
    torch.testing.assert_close(model(x)[0], reference(x)[0], rtol=1e-3, atol=1e-4)


def test_max_autotune_compiles_without_cuda_graphs(monkeypatch):
    """CUDA graphs would let the next replay overwrite the states carried between steps: max-autotune maps
    to Inductor's max-autotune-no-cudagraphs, for the blocks, a whole model and the loss alike."""
    assert compile_module._compile_kwargs("max-autotune") == {"mode": "max-autotune-no-cudagraphs"}
    assert compile_module._compile_kwargs("default") == {}
    modes = []
    real_compile = torch.compile

    def recording_compile(fn, *args, **kwargs):
        modes.append(kwargs.get("mode"))
        return real_compile(fn, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    compile_model(_tiny_gpt(n_layers=2), "max-autotune")
    compile_model(torch.nn.Linear(4, 4), "max-autotune")
    compile_loss("max-autotune")
    assert modes == ["max-autotune-no-cudagraphs"] * 4


@pytest.mark.parametrize(
    "native_bf16, expected",
    [(True, "bf16"), (False, "fp16")],  # Ampere and later / V100, T4 (bf16 only emulated there)
)
def test_auto_precision_counts_only_bf16_in_hardware(monkeypatch, native_bf16, expected):
    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return native_bf16 or including_emulation  # pre-Ampere: supported only through emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert device_module.resolve_precision("auto", torch.device("cuda", 0)) == expected
    assert calls == [False]
    assert device_module.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert device_module.resolve_precision("bf16", torch.device("cuda", 0)) == "bf16"  # asked for: kept


def test_auto_precision_on_torch_without_including_emulation(monkeypatch):
    """torch before 2.5 has no including_emulation: the compute capability decides (bf16 from sm_80)."""

    def old_is_bf16_supported():
        return True

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", old_is_bf16_supported)
    for capability, expected in [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert device_module.resolve_precision("auto", torch.device("cuda", 0)) == expected


def test_tf32_switched_on_by_a_test_is_switched_off_after_it():
    """The conftest fixture restores the fp32 matmul settings after each test; this one leaves TF32 on
    (as configure_device does on CUDA), and the next test checks that it is off again."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("high")
    _tf32_state.append((torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()))


def test_tf32_is_restored_by_the_fixture():
    if not _tf32_state:
        pytest.skip("checks what the test before it left behind; run the whole module")
    assert torch.backends.cudnn.allow_tf32 == _session_tf32[1]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()) == (
        _session_tf32[0],
        _session_tf32[2],
    )


_tf32_state: list = []
_session_tf32 = (
    torch.backends.cuda.matmul.allow_tf32,
    torch.backends.cudnn.allow_tf32,
    torch.get_float32_matmul_precision(),
)
