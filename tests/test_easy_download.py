"""The seed's `./languini/dataset_lib/easy_download_and_tokenise.sh`: which corpus it prepares, and how."""

import os
import subprocess

from helpers import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "languini", "dataset_lib", "easy_download_and_tokenise.sh")


def run(env_extra, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("BOOKS3_DIR", "SPLIT_LISTS", "TOKENIZER")}
    return subprocess.run([SCRIPT, *args], env={**env, "DRY_RUN": "1", **env_extra}, capture_output=True, text=True)


def test_without_books3_it_prepares_pg19():
    r = run({}, "--max-books", "10")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("languini data prepare pg19 --out data/pg19 --max-books 10")


def test_with_a_books3_tree_it_reproduces_languini_books():
    r = run({"BOOKS3_DIR": "/b3", "SPLIT_LISTS": "/lists", "TOKENIZER": "/t/books_16384.model"})
    assert r.returncode == 0, r.stderr
    expected = "languini data prepare books3 /b3 --split-lists /lists --out data/books --tokenizer /t/books_16384.model"
    assert r.stdout.strip() == expected


def test_half_a_books3_setting_is_one_clear_error():
    r = run({"BOOKS3_DIR": "/b3"})
    assert r.returncode == 2 and r.stderr.strip().startswith("error: set both BOOKS3_DIR")
