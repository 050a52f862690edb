"""`languini data verify DIR`: compare a dataset's token files with the manifest recorded in meta.json."""

import os

from languini.common_lib.errors import UserError
from languini.dataset_lib.integrity_test import KNOWN_HASHES, file_sizes, hashed_folder, integrity_hash
from languini.dataset_lib.layout import read_meta


def compare_manifests(expected: dict[str, int], actual: dict[str, int]) -> list[str]:
    """One line per missing, extra or resized file (paths relative to the dataset folder)."""
    problems = [f"missing: {p}" for p in sorted(set(expected) - set(actual))]
    problems += [f"extra: {p}" for p in sorted(set(actual) - set(expected))]
    problems += [f"resized: {p} ({expected[p]} -> {actual[p]} bytes)"
                 for p in sorted(set(expected) & set(actual)) if expected[p] != actual[p]]
    return problems


def verify_dataset(path: str) -> tuple[str, list[str]]:
    """(integrity hash now, problems); an empty problem list means the data is intact."""
    folder = hashed_folder(path)
    actual = file_sizes(folder, base=path)
    digest = integrity_hash(actual)
    meta = read_meta(path)
    if not meta:
        known = KNOWN_HASHES.get(os.path.basename(os.path.normpath(path)))
        if known is None:
            raise UserError(f"{path} has no meta.json to compare with (its integrity hash is {digest})")
        return digest, [] if digest == known else [f"hash {digest} differs from the published {known}"]
    problems = compare_manifests(meta.get("files", {}), actual)
    if not problems and digest != meta.get("integrity_sha256"):
        problems.append(f"hash {digest} differs from meta.json's {meta.get('integrity_sha256')}")
    return digest, problems
