#!/usr/bin/env bash
# Copy this languini folder's code to a server (not data, runs, virtual environments, caches or git history):
#
#   ./sync.sh user@host                 # into ~/<this folder's name> on the server
#   ./sync.sh user@host:experiments/    # into experiments/<this folder's name>
#   ./sync.sh user@host --dry-run       # list what would be copied; other rsync options pass through too
#   ./sync.sh /mnt/backup/              # a local folder works too (a path starting with / or .)
#
# Files deleted here are deleted there too (inside the synced folder only; excluded paths are left alone).
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: ./sync.sh [user@]host[:path] [rsync options, e.g. --dry-run]" >&2
    exit 2
fi
TARGET=$1
shift
[[ $TARGET == *:* || $TARGET == /* || $TARGET == .* ]] || TARGET="$TARGET:"  # a bare host: its home

if ! command -v rsync >/dev/null 2>&1; then
    echo "error: sync.sh needs rsync, which is not installed here; install it (e.g. apt-get install rsync, brew install rsync) and run again" >&2
    exit 2
fi

SOURCE="$(cd "$(dirname "$0")" && pwd -P)"
ROOT="/$(basename "$SOURCE")"  # rsync anchors /patterns at the folder that holds the synced one
EXCLUDES=(
    "$ROOT/data/" "$ROOT/runs/" "$ROOT/wandb/" "$ROOT/logs/" venv/ .venv/ .git/ __pycache__/ .pytest_cache/ .ruff_cache/ .mypy_cache/
    .ipynb_checkpoints/ '*.egg-info/' '*.pyc' .DS_Store
)

exec rsync -a --delete --info=stats1 "${EXCLUDES[@]/#/--exclude=}" "$@" "$SOURCE" "$TARGET"
