"""benchmarks/gpu.sh: its commands from a bare checkout (no installed languini), the CPU smoke of its tiniest
commands, the summary it rebuilds from whatever results a folder holds, and its one-line mistakes."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu.sh")


def _bare_environment(tmp_path) -> dict:
    """An environment in which `import languini` fails unless PYTHONPATH names the checkout.

    `python3` on PATH is this interpreter run with -S, so no site-packages folder is added and no .pth
    file (the editable install's) is read. The installed packages are reachable only through PYTHONPATH
    as a folder of links to every site-packages entry except languini's own."""
    view = tmp_path / "site"
    view.mkdir()
    site_dirs = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]
    for folder in site_dirs:
        for name in sorted(os.listdir(folder)):
            lowered = name.lower()
            if lowered.startswith(("languini", "__editable__")) or lowered.endswith(".pth") or (view / name).exists():
                continue
            (view / name).symlink_to(os.path.join(folder, name))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python3"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    python.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": str(view), "LANG": "C.UTF-8"}


def _gpu_sh(*args, env=None, timeout=600):
    return subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd="/")  # fmt: skip


def test_bare_checkout_dry_run_and_cpu_smoke(tmp_path):
    env = _bare_environment(tmp_path)
    probe = subprocess.run(["python3", "-c", "import languini"], env=env, cwd=str(tmp_path), capture_output=True)
    assert probe.returncode != 0, "languini is importable without the checkout: the test proves nothing"

    dry = _gpu_sh("--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    commands = [line for line in dry.stdout.splitlines() if line.startswith("timeout ")]
    assert "gpt small --train_batch_size 64 --precision bf16 --compile default --device cuda" in commands[0]
    assert "--scan triton" in commands[1] and "--scan torch" in commands[2]  # the runs in order of value
    assert "pytest -q -m gpu" in commands[-1]
    assert all("--json benchmarks/results/<device>/" in c for c in commands if "throughput" in c)

    out = tmp_path / "results"
    smoke = _gpu_sh("--cpu-smoke", "--only", "gpt_small_compiled,eval_gpt_small", "--out", str(out), env=env)
    assert smoke.returncode == 0, smoke.stdout[-3000:] + smoke.stderr[-3000:]
    result = json.loads((out / "gpt_small_compiled.json").read_text())
    assert result["device"].startswith("CPU") and result["tokens_per_second"] > 0 and result["preset"] == "nano"
    assert result["run"]["exit_code"] == 0 and "--device cpu" in result["run"]["command"]
    evaluation = json.loads((out / "eval_gpt_small.json").read_text())
    assert evaluation["same_numbers"] and evaluation["loss_relative_difference"] < 1e-5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] and list(summary["results"]) == ["gpt_small_compiled", "eval_gpt_small"]
    assert summary["comparisons"]["eval_same_numbers"] is True
    assert (out / "log.txt").is_file()


def _result(tokens_per_second, order, **extra):
    return {"device": "NVIDIA H200", "torch_version": "2.11.0", "tokens_per_second": tokens_per_second,
            "run": {"id": "x", "order": order, "command": "python3 ...", "exit_code": 0}, **extra}  # fmt: skip


def test_summary_is_rebuilt_from_whatever_results_exist(tmp_path):
    (tmp_path / "lstm_small_scan_torch.json").write_text(json.dumps(_result(10_000.0, 3)))
    (tmp_path / "lstm_small_scan_triton.json").write_text(json.dumps(_result(25_000.0, 2)))
    (tmp_path / "gpt_small_compiled.json").write_text(
        json.dumps(_result(400_000.0, 1, mfu=0.5, mfu_causal_attention=0.47))
    )
    timed_out = {"error": "timed out after 180 s", "run": {"order": 4, "command": "python3 ...", "exit_code": 124}}
    (tmp_path / "gpt_medium_compiled.json").write_text(json.dumps(timed_out))
    proc = _gpu_sh("--summary", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"] == "NVIDIA H200" and not summary["smoke"]
    assert list(summary["results"]) == ["gpt_small_compiled", "lstm_small_scan_triton", "lstm_small_scan_torch",
                                        "gpt_medium_compiled"]  # fmt: skip
    targets = summary["targets"]
    assert targets["qlstm_small_triton_over_torch_scan"] == 2.5 and targets["qlstm_small_triton_met"] is True
    assert targets["gpt_small_mfu"] == 0.5 and targets["gpt_small_mfu_met"] is False
    assert targets["gpt_small_mfu_causal_attention"] == 0.47
    assert summary["results"]["gpt_medium_compiled"]["error"] == "timed out after 180 s"
    assert "timed out after 180 s" in proc.stdout


def test_parts_and_only_select_runs():
    proc = _gpu_sh("--dry-run", "--part", "scan,eval")
    names = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("# ") and "(part" in line]
    assert names == ["lstm_small_scan_triton", "lstm_small_scan_torch", "eval_gpt_small"]
    proc = _gpu_sh("--dry-run", "--skip-tests")
    assert proc.returncode == 0 and "pytest" not in proc.stdout
    proc = _gpu_sh("--dry-run", "--only", "gpt_small_eager", "--out", "/somewhere")
    (command,) = [line for line in proc.stdout.splitlines() if line.startswith("timeout ")]
    assert "--compile none" in command and command.endswith("--json /somewhere/gpt_small_eager.json")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fast"], "unknown option '--fast'"),
        (["--part", "everything"], "unknown part 'everything'"),
        (["--out"], "--out needs a value"),
        (["--timeout", "soon"], "--timeout expects seconds"),
        (["--dry-run", "--only", "gpt_huge"], "unknown run 'gpt_huge'"),
    ],
)
def test_mistakes_exit_2_with_one_line(args, message):
    proc = _gpu_sh(*args)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
