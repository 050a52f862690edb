"""throughput.py on CPU with nano configs: sane JSON, FLOPs close to the analytic count, clear errors."""

import json

import pytest
import torch
from helpers import preset_config

from languini.common_lib import hardware
from languini.common_lib.config import split_tool_flags
from languini.tools import throughput
from languini.tools.compute_classes import THROUGHPUT_CLASS_HOURS, steps_for
from languini.tools.flops import analytic_gpt_training_flops, build_model, param_counts
from languini.tools.throughput import auto_steps, group_sizes, is_oom, is_oom_text, main
from languini.train_lib.random_batches import RandomBatches
from languini.train_lib.state import detach_state

FAST = ["--device", "cpu", "--seq_len", "32", "--steps", "2", "--warmup", "1"]


def _run(tmp_path, project, *flags):
    path = tmp_path / "result.json"
    assert main([project, "nano", *FAST, *flags, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_gpt_nano_gives_sane_json(tmp_path):
    r = _run(tmp_path, "gpt", "--train_batch_size", "2")
    assert r["tokens_per_second"] > 0 and r["step_ms_median"] > 0 and r["timed_steps"] == 2
    assert r["timed_groups"] == 2 and r["steps_per_group"] == [1, 1] and len(r["step_ms_groups"]) == 2
    assert r["tokens_per_step"] == 2 * 32 and r["precision"] == "fp32"
    assert r["torch_version"] == torch.__version__ and r["device"].startswith("CPU")
    cfg = preset_config("gpt", "nano")
    cfg.seq_len = 32
    assert (r["params_total"], r["params_non_embedding"]) == param_counts(build_model("gpt", cfg, "meta"), 4096)
    analytic_per_token = analytic_gpt_training_flops(cfg) / cfg.seq_len
    assert r["flops_per_token"] == pytest.approx(analytic_per_token, rel=0.02)
    assert r["achieved_tflops"] == pytest.approx(r["flops_per_token"] * r["tokens_per_second"] / 1e12)
    assert r["mfu"] is None and r["mfu_causal_attention"] is None  # no peak known for a CPU
    # causal attention: half of the T x T products (forward + backward: 3 x 2 products of 2·T²·inner per layer)
    attention = 3 * cfg.n_layers * 2 * 2 * 32 * 32 * cfg.n_heads * cfg.head_dim / 32
    assert r["flops_per_token_causal"] == pytest.approx(r["flops_per_token"] - attention / 2)
    assert r["achieved_tflops_causal"] == pytest.approx(r["flops_per_token_causal"] * r["tokens_per_second"] / 1e12)
    assert "full T x T" in r["attention_flops_convention"]
    assert r["rtx3090_tokens_per_second"] is None  # nano has no published figure
    expected = {str(h): steps_for(h, r["tokens_per_second"], 2, 32) for h in THROUGHPUT_CLASS_HOURS}
    assert r["compute_class_steps"] == expected


def test_accumulation_and_peak_flag(tmp_path, capsys):
    r = _run(tmp_path, "gpt", "--train_batch_size", "4", "--gradient_accumulation_steps", "2", "--peak_tflops", "2")
    assert r["gradient_accumulation_steps"] == 2 and r["tokens_per_step"] == 4 * 32
    assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 2)
    assert r["mfu_causal_attention"] == pytest.approx(r["achieved_tflops_causal"] / 2)
    assert r["mfu_causal_attention"] < r["mfu"]
    captured = capsys.readouterr()
    assert "MFU" in captured.out and "causal attention" in captured.out
    assert "timing 2 steps: about" in captured.err  # on CPU: the estimate after the warm-up step


def test_steps_are_timed_in_groups_between_synchronisations(monkeypatch):
    syncs, steps = [], []
    monkeypatch.setattr(throughput, "synchronize", lambda device: syncs.append(len(steps)))
    groups = throughput._timed_steps(lambda: steps.append(1), torch.device("cuda", 0), 12, 2, progress=False)
    assert [size for size, _ in groups] == [3, 3, 2, 2, 2] and len(steps) == 14
    # before and after the last warm-up step, then once after each group: never between two steps of a group
    assert syncs == [1, 2, 5, 8, 10, 12, 14]


def test_group_sizes_and_automatic_step_counts():
    assert group_sizes(12) == [3, 3, 2, 2, 2] and group_sizes(2) == [1, 1] and group_sizes(1) == [1]
    assert sum(group_sizes(99)) == 99 and len(group_sizes(99)) == throughput.TIMING_GROUPS
    assert auto_steps(0.01, "cuda") == 100 and auto_steps(0.1, "cuda") == 30 and auto_steps(1.0, "cuda") == 10
    assert auto_steps(10.0, "cpu") == 3 and auto_steps(0.5, "cpu") == 6 and auto_steps(0.001, "cpu") == 20
    assert auto_steps(None, "cpu") == 3  # no warm-up step to estimate from


def test_cpu_auto_mode_times_few_steps_and_says_how_long(monkeypatch, capsys):
    clock = iter(range(0, 10_000, 10))  # every step takes 10 s of this clock
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    groups = throughput._timed_steps(lambda: None, torch.device("cpu"), 0, 1, progress=False)
    assert sum(size for size, _ in groups) == 3
    err = capsys.readouterr().err
    assert "timing 3 steps (auto): about 30 s" in err and "--steps 1 shortens it" in err


def test_random_batches_are_contiguous():
    cfg = preset_config("gpt", "nano")
    cfg.train_batch_size, cfg.gradient_accumulation_steps, cfg.seq_len = 4, 2, 8
    x, y, padded = next(RandomBatches(cfg))
    assert x.shape == y.shape == padded.shape == (2, 2, 8) and x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x[..., 1:], y[..., :-1])  # y is x shifted by one token


@pytest.mark.parametrize(
    "message",
    [
        "CUDA out of memory. Tried to allocate 2.00 GiB",
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
        "CUSOLVER_STATUS_ALLOC_FAILED",
    ],
)
def test_cuda_library_allocation_failures_count_as_out_of_memory(message):
    assert is_oom(RuntimeError(message)) and is_oom_text(f"Traceback ...\nRuntimeError: {message}\n")
    wrapped = RuntimeError("backend='inductor' raised an error")
    wrapped.__cause__ = RuntimeError(message)
    assert is_oom(wrapped)  # torch.compile wraps the error in its own


def test_other_errors_are_not_out_of_memory():
    assert not is_oom(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_oom_text("CUBLAS_STATUS_EXECUTION_FAILED") and not is_oom_text("")


def test_oom_during_measure_exits_3_with_an_oom_json(tmp_path, monkeypatch, capsys):
    def cublas_fails(*args, **kwargs):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    monkeypatch.setattr(throughput, "measure", cublas_fails)
    path = tmp_path / "r.json"
    assert main(["gpt", "nano", "--device", "cpu", "--train_batch_size", "8", "--json", str(path)]) == 3
    assert json.loads(path.read_text()) == {"project": "gpt", "preset": "nano", "train_batch_size": 8, "oom": True}
    assert "out of memory at train_batch_size 8" in capsys.readouterr().err


def test_stateful_lstm_nano(tmp_path):
    pytest.importorskip("languini.projects.lstm.model")
    r = _run(tmp_path, "lstm", "--train_batch_size", "2", "--gradient_accumulation_steps", "2")
    assert r["tokens_per_second"] > 0 and r["flops_per_token"] > 0


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA GeForce RTX 3090", 71),
        ("NVIDIA GeForce RTX 3090 Ti", 80),  # not the RTX 3090's figure
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989),
        ("NVIDIA H200 NVL", 835),  # not the H200 SXM's figure
        ("Tesla V100-SXM2-16GB", 125),
        ("Tesla V100-PCIE-32GB", 112),
        ("Tesla T4", 65),
        ("CPU (x86_64, 2 threads)", None),
        ("NVIDIA GeForce RTX 4090", None),
        ("NVIDIA RTX A1000", None),  # no A100: the pattern is a whole model number
        ("NVIDIA RTX A1000 6GB Laptop GPU", None),
    ],
)
def test_peak_table_lookup(name, peak):
    assert hardware.peak_tflops(name) == peak


def test_peak_lookup_takes_the_most_specific_name_whatever_the_order(monkeypatch):
    monkeypatch.setattr(hardware, "PEAK_BF16_TFLOPS", list(reversed(hardware.PEAK_BF16_TFLOPS)))
    assert hardware.peak_tflops("NVIDIA H200 NVL") == 835 and hardware.peak_tflops("NVIDIA H200") == 989
    assert hardware.peak_tflops("NVIDIA H100 PCIe") == 756 and hardware.peak_tflops("NVIDIA GeForce RTX 3090 Ti") == 80
    assert hardware.mfu(10.0, None) is None and hardware.mfu(10.0, 40.0) == 0.25


def test_tool_flags_are_split_from_config_flags():
    flags = {"json": (str, "", ""), "steps": (int, 0, ""), "calibrate": (bool, False, "")}
    values, rest = split_tool_flags(["small", "--steps=3", "--h_dim", "8", "--calibrate", "--json", "f"], flags)
    assert values == {"json": "f", "steps": 3, "calibrate": True} and rest == ["small", "--h_dim", "8"]


def test_detach_state_handles_nested_states():
    w = torch.ones(2, requires_grad=True)
    state = [(w * 2, w * 3), (w * 4, w * 5)]
    detached = detach_state(state)
    assert all(not t.requires_grad for pair in detached for t in pair) and detach_state(None) is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["gpz", "nano"], "unknown project 'gpz'"),
        (["gpt", "nanoo"], "unknown preset 'nanoo'"),
        (["gpt", "nano", "--device", "tpu"], "--device must be one of"),
        (["gpt", "nano", "--steps", "many"], "--steps expects int"),
        (["gpt", "nano", "--train_batch_size", "3", "--gradient_accumulation_steps", "2"], "must be divisible by processes x accumulation steps"),
        (["gpt", "nano", "--steps", "-1"], "--steps must be >= 0"),
        (["gpt", "nano", "--warmup", "-5"], "--warmup >= -1"),
        (["gpt", "nano", "--peak_tflops", "-1"], "--peak_tflops must be a finite number >= 0"),
        (["gpt", "nano", "--train_batch_size", "0"], "--train_batch_size must be at least 1"),
        (["gpt", "nano", "--seq_len", "-1"], "--seq_len must be at least 1"),
        (["gpt", "nano", "--h_dim", "0"], "--h_dim must be at least 1"),
        (["gpt", "nano", "--step", "1"], "did you mean '--steps'"),
    ],
)
def test_mistakes_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["gpt", "nano", "--device", "cuda"])
    assert exit_info.value.code == 2 and "no CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpt_nano_on_gpu_reports_mfu(tmp_path):
    path = tmp_path / "gpu.json"
    assert main(["gpt", "nano", "--device", "cuda", "--steps", "5", "--json", str(path)]) == 0
    r = json.loads(path.read_text())
    assert r["tokens_per_second"] > 0 and r["peak_memory_mb"] > 0 and r["precision"] in ("bf16", "fp16")
