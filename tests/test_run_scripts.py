"""run.sh (GPU ids -> CUDA_VISIBLE_DEVICES and process count) and sync.sh (what is copied), on CPU."""

import os
import re
import shutil
import subprocess

import pytest
from helpers import REPO_ROOT

RUN_SH = os.path.join(REPO_ROOT, "run.sh")
SYNC_SH = os.path.join(REPO_ROOT, "sync.sh")


def dry_run(*args):
    env = {**os.environ, "RUN_SH_DRY_RUN": "1"}
    return subprocess.run([RUN_SH, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("ids,n", [("0", 1), ("0,3,4,5", 4), ("2,7", 2)])
def test_run_sh_sets_devices_and_process_count(ids, n):
    proc = dry_run(ids, "--max_train_steps", "7")
    assert proc.returncode == 0, proc.stderr
    command = proc.stdout.strip()
    assert command.startswith(f"CUDA_VISIBLE_DEVICES={ids} torchrun ")
    assert f"--nproc_per_node={n} " in command
    assert "languini/projects/gpt/main.py mini" in command
    assert command.endswith("--max_train_steps 7")  # extra arguments are appended
    port = int(re.search(r"--master_port=(\d+)", command).group(1))
    assert 0 < port < 65536


def test_run_sh_rejects_bad_ids():
    proc = dry_run("0,gpu1")
    assert proc.returncode == 2 and "GPU ids" in proc.stderr


def test_run_sh_picks_a_free_port_each_time():
    ports = {re.search(r"--master_port=(\d+)", dry_run("0").stdout).group(1) for _ in range(3)}
    assert len(ports) > 1


@pytest.fixture
def code_tree(tmp_path):
    """A small fake checkout holding both code and everything sync.sh must leave behind."""
    root = tmp_path / "kitchen"
    keep = ["run.sh", "languini/cli.py", "languini/dataset_lib/layout.py", "tests/test_x.py", "docs/a.md"]
    skip = [
        "data/demo/file_list_train.npy", "runs/gpt/exp/metrics.jsonl", "venv/bin/python", ".venv/pyvenv.cfg",
        ".git/HEAD", "languini/__pycache__/cli.cpython-311.pyc", "languini.egg-info/PKG-INFO",
        "wandb/run/log.txt", ".pytest_cache/v", ".ruff_cache/x", "logs/a.log",
    ]  # fmt: skip
    for rel in keep + skip:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rel)
    shutil.copy(SYNC_SH, root / "sync.sh")
    return root, keep + ["sync.sh"]


def synced_files(dest):
    return sorted(
        os.path.relpath(os.path.join(folder, f), dest) for folder, _, files in os.walk(dest) for f in files
    )


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")
def test_sync_sh_copies_code_only(tmp_path, code_tree):
    root, keep = code_tree
    dest = tmp_path / "server"
    dest.mkdir()
    dry = subprocess.run(
        [root / "sync.sh", str(dest), "--dry-run"], capture_output=True, text=True, timeout=60
    )
    assert dry.returncode == 0, dry.stderr
    assert synced_files(dest) == []  # --dry-run passes through to rsync

    proc = subprocess.run([root / "sync.sh", str(dest)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert synced_files(dest) == sorted(os.path.join("kitchen", k) for k in keep)


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")
def test_sync_sh_keeps_server_data_and_deletes_removed_code(tmp_path, code_tree):
    root, _ = code_tree
    dest = tmp_path / "server"
    (dest / "kitchen" / "data").mkdir(parents=True)
    (dest / "kitchen" / "data" / "big.npy").write_text("server data")
    (dest / "kitchen" / "old_module.py").write_text("removed locally")
    subprocess.run([root / "sync.sh", str(dest)], check=True, capture_output=True, timeout=60)
    assert (dest / "kitchen" / "data" / "big.npy").read_text() == "server data"
    assert not (dest / "kitchen" / "old_module.py").exists()


def test_sync_sh_usage():
    proc = subprocess.run([SYNC_SH], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
