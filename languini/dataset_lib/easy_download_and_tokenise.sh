#!/usr/bin/env bash
# Download and tokenise a training corpus into data/ (slow: run it once).
#
# books3 is no longer distributed, so this script cannot download it. It prepares:
#   - Languini Books (data/books/books_16384, the benchmark of the paper) from a local books3 tree, when
#     BOOKS3_DIR (the tree) and SPLIT_LISTS (the original file_list_*.npy) are set; pass the original
#     tokenizer as TOKENIZER=.../books_16384.model to reproduce the published token files and hash;
#   - otherwise PG-19 (public-domain books, downloaded over HTTPS) into data/pg19/pg19_16384.
# Every step is resumable: run the script again after an interruption.
# DRY_RUN=1 prints the command instead of running it; extra arguments go to `languini data prepare`.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [[ -n "${BOOKS3_DIR:-}" || -n "${SPLIT_LISTS:-}" ]]; then
    if [[ -z "${BOOKS3_DIR:-}" || -z "${SPLIT_LISTS:-}" ]]; then
        echo "error: set both BOOKS3_DIR (the books3 tree) and SPLIT_LISTS (the original split lists)" >&2
        exit 2
    fi
    cmd=(languini data prepare books3 "$BOOKS3_DIR" --split-lists "$SPLIT_LISTS" --out data/books)
    [[ -n "${TOKENIZER:-}" ]] && cmd+=(--tokenizer "$TOKENIZER")
    check="python3 languini/dataset_lib/integrity_test.py data/books/books_16384"
    train="torchrun --standalone languini/projects/gpt/main.py"
else
    echo "books3 is not downloadable; preparing the open PG-19 corpus instead (set BOOKS3_DIR and SPLIT_LISTS for books3)"
    cmd=(languini data prepare pg19 --out data/pg19)
    check="languini data verify data/pg19/pg19_16384"
    train="torchrun --standalone languini/projects/gpt/main.py --data_root data/pg19 --dataset pg19_16384"
fi
cmd+=("$@")

if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
"${cmd[@]}"
echo "check it:  $check"
echo "train on it:  $train"
