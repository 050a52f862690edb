"""Run bundles: a trained run packed for sharing, checked before it is trusted (docs/sharing.md).

A bundle is a folder laid out like a run folder, so `languini report` reads it as one, with the weights in
the safe `safetensors` format instead of a pickled training checkpoint:

    model.safetensors   the weights only (no optimiser, RNG or loader state; loading runs no code)
    config.json metrics.jsonl env.json command.txt source.zip eval/<split>.json   as in the run folder
                        (results on another corpus, eval/<split>@<dataset>.json, are not exported)
    corpus.json         the corpus identity (tokenizer and file-list hashes) the run trained on
    tokenizer.model     the corpus's SentencePiece model, when the run's dataset had one
    README.md           what it is, the results, the commands that reproduce them, how to verify
    MANIFEST.sha256     `<sha256>  <path>` for every other file; nothing outside it may be present

`verify_bundle` checks all of that (and that the weights fit the project the config names) and returns one
line per problem; `load_bundle` verifies first, then returns the config and weights.
"""

import json
import os
import stat

import torch

from languini.common_lib.errors import UserError
from languini.dataset_lib.layout import is_safe_name, sha256_file, sha256_stream

WEIGHTS = "model.safetensors"
MANIFEST = "MANIFEST.sha256"
CONFIG = "config.json"
CORPUS = "corpus.json"
REQUIRED = (WEIGHTS, CONFIG, "README.md")


def bundle_files(folder: str) -> list[str]:
    """Every file under `folder` (relative paths, sorted), the manifest excepted; links count as files."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST:
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def manifest_text(folder: str) -> str:
    return "".join(f"{sha256_file(os.path.join(folder, rel))}  {rel}\n" for rel in bundle_files(folder))


def _read_manifest(folder: str, problems: list[str]) -> dict[str, str]:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        problems.append(f"no {MANIFEST}: not a bundle written by `languini export`")
        return {}
    entries = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            digest, sep, rel = line.rstrip("\n").partition("  ")
            if not sep or len(digest) != 64 or not rel:
                problems.append(f"{MANIFEST} line {number} is malformed")
                continue
            entries[rel] = digest
    return entries


def _special_kind(path: str) -> str | None:
    """What `path` itself is when it is not a plain file (a link is not followed); None for a plain file."""
    mode = os.lstat(path).st_mode
    if stat.S_ISREG(mode):
        return None
    return "a symbolic link" if stat.S_ISLNK(mode) else "a special file (pipe, socket or device)"


def _plain_sha256(path: str) -> str | None:
    """SHA-256 of the plain file `path`, opened without following a link or waiting on a pipe; None when it
    cannot be opened or is no longer a plain file once opened (swapped after it was checked)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        return sha256_stream(f) if stat.S_ISREG(os.fstat(fd).st_mode) else None


def _check_files(folder: str, problems: list[str]):
    manifest = _read_manifest(folder, problems)
    present = bundle_files(folder)
    for rel in present:
        full = os.path.join(folder, rel)
        kind = _special_kind(full)
        if kind:
            problems.append(f"{rel} is {kind} (a bundle holds plain files only)")
        elif rel not in manifest:
            problems.append(f"{rel} is not in {MANIFEST} (an added file)")
        elif _plain_sha256(full) != manifest[rel]:
            problems.append(f"{rel} does not match its hash in {MANIFEST} (changed or damaged)")
    for rel in sorted(set(manifest) - set(present)):
        problems.append(f"{rel} is listed in {MANIFEST} but missing")
    for rel in REQUIRED:
        if manifest and rel not in manifest:
            problems.append(f"{rel} is missing from the bundle")


def is_bundle(folder: str) -> bool:
    """A folder holding a bundle's manifest or weights: it is verified before anything in it is trusted."""
    return any(os.path.lexists(os.path.join(folder, name)) for name in (MANIFEST, WEIGHTS))


def read_eval_results(folder: str) -> dict[str, dict]:
    """The `eval/<split>.json` results in a run or bundle folder, by split (plain files that name a split);
    a result scored on another corpus than the run's (`other_corpus`) is not the run's own and is left out."""
    results = {}
    eval_dir = os.path.join(folder, "eval")
    for name in sorted(os.listdir(eval_dir)) if os.path.isdir(eval_dir) else []:
        path = os.path.join(eval_dir, name)
        if not name.endswith(".json") or os.path.islink(path) or not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and name == f"{data.get('split')}.json" and not data.get("other_corpus"):
            results[data["split"]] = data
    return results


def read_config_dict(folder: str) -> dict:
    try:
        with open(os.path.join(folder, CONFIG), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {os.path.join(folder, CONFIG)}: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("project"), str):
        raise UserError(f"{os.path.join(folder, CONFIG)} does not name its project")
    return config


def read_weights(folder: str) -> dict[str, torch.Tensor]:
    """The bundle's weights (safetensors: plain tensors, no code runs)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(folder, WEIGHTS)
    try:
        return load_file(path, device="cpu")
    except (OSError, SafetensorError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def verify_bundle(folder: str, build_model) -> list[str]:
    """Every problem of the bundle in `folder`, one line each (empty: the bundle is intact).

    `build_model(config_dict)` returns the named project's model (e.g. on the meta device), so the weights
    are checked against it: names, shapes and parameter count.
    """
    if not os.path.isdir(folder):
        return [f"no bundle folder at {folder}"]
    problems: list[str] = []
    _check_files(folder, problems)
    if problems:
        return problems
    try:
        config = read_config_dict(folder)
        weights = read_weights(folder)
        model = build_model(config)
    except UserError as e:
        return [str(e)]
    split = config.get("eval_data_split", "test")
    if not is_safe_name(split):  # eval.py names its result file after it
        problems.append(f"{CONFIG}: eval_data_split {split!r} is not a safe identifier")
    expected = model.state_dict()
    problems += [f"{WEIGHTS} lacks {k}" for k in expected if k not in weights]
    problems += [f"{WEIGHTS} has {k}, which the model does not" for k in weights if k not in expected]
    problems += [
        f"{WEIGHTS}: {k} is {tuple(weights[k].shape)}, the model's {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    return problems


def check_bundle(folder: str, build_model):
    """Refuse a bundle with any problem in one line naming it (its first problem; verify-bundle lists all)."""
    problems = verify_bundle(folder, build_model)
    if problems:
        more = f" (and {len(problems) - 1} more: run `languini verify-bundle {folder}`)" if len(problems) > 1 else ""
        raise UserError(f"bundle {folder} failed verification: {problems[0]}{more}")


def load_bundle(folder: str, build_model) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, weights) of a verified bundle; a bundle with any problem is refused with one line."""
    check_bundle(folder, build_model)
    return read_config_dict(folder), read_weights(folder)
