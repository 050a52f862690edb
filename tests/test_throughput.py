"""throughput.py on CPU with nano configs: sane JSON, FLOPs close to the analytic count, clear errors."""

import json

import pytest
import torch
from helpers import preset_config

from languini.common_lib import hardware
from languini.common_lib.config import split_tool_flags
from languini.tools.compute_classes import THROUGHPUT_CLASS_HOURS, steps_for
from languini.tools.flops import analytic_gpt_training_flops, build_model, param_counts
from languini.tools.throughput import main
from languini.train_lib.state import detach_state

FAST = ["--device", "cpu", "--seq_len", "32", "--steps", "2", "--warmup", "1"]


def _run(tmp_path, project, *flags):
    path = tmp_path / "result.json"
    assert main([project, "nano", *FAST, *flags, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_gpt_nano_gives_sane_json(tmp_path):
    r = _run(tmp_path, "gpt", "--train_batch_size", "2")
    assert r["tokens_per_second"] > 0 and r["step_ms_median"] > 0 and r["timed_steps"] == 2
    assert r["tokens_per_step"] == 2 * 32 and r["precision"] == "fp32"
    assert r["torch_version"] == torch.__version__ and r["device"].startswith("CPU")
    cfg = preset_config("gpt", "nano")
    cfg.seq_len = 32
    assert (r["params_total"], r["params_non_embedding"]) == param_counts(build_model("gpt", cfg, "meta"), 4096)
    analytic_per_token = analytic_gpt_training_flops(cfg) / cfg.seq_len
    assert r["flops_per_token"] == pytest.approx(analytic_per_token, rel=0.02)
    assert r["achieved_tflops"] == pytest.approx(r["flops_per_token"] * r["tokens_per_second"] / 1e12)
    assert r["mfu"] is None  # no peak known for a CPU
    expected = {str(h): steps_for(h, r["tokens_per_second"], 2, 32) for h in THROUGHPUT_CLASS_HOURS}
    assert r["compute_class_steps"] == expected


def test_accumulation_and_peak_flag(tmp_path, capsys):
    r = _run(tmp_path, "gpt", "--train_batch_size", "4", "--gradient_accumulation_steps", "2", "--peak_tflops", "2")
    assert r["gradient_accumulation_steps"] == 2 and r["tokens_per_step"] == 4 * 32
    assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 2)
    assert "MFU" in capsys.readouterr().out


def test_stateful_lstm_nano(tmp_path):
    pytest.importorskip("languini.projects.lstm.model")
    r = _run(tmp_path, "lstm", "--train_batch_size", "2", "--gradient_accumulation_steps", "2")
    assert r["tokens_per_second"] > 0 and r["flops_per_token"] > 0


def test_peak_table_lookup():
    assert hardware.peak_tflops("NVIDIA GeForce RTX 3090") == 71
    assert hardware.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert hardware.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert hardware.peak_tflops("NVIDIA H100 PCIe") == 756
    assert hardware.peak_tflops("NVIDIA H200") == 989
    assert hardware.peak_tflops("CPU (x86_64, 2 threads)") is None
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
