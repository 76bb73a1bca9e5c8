#!/usr/bin/env bash
# Set up somi-ray on a fresh Debian machine with Python 3.11: create .venv in the repository
# root, install torch and the package with its dev extras, then fetch the real teachers and
# corpora into $SOMI_RAY_CACHE (default ~/.cache/somi-ray). Safe to run again: finished steps
# are skipped or take seconds.
#
# Usage: bash scripts/setup.sh
# Environment: PYTHON (interpreter for the new venv, default python3.11 or python3),
#              SOMI_RAY_CACHE (asset cache root), SKIP_FETCH=1 (install only).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
started=$SECONDS

step() { printf '[setup %4ds] %s\n' "$((SECONDS - started))" "$*"; }

python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [[ ! -x "$venv/bin/python" ]]; then
    step "create virtual environment $venv with $python"
    "$python" -m venv "$venv"
else
    step "reuse virtual environment $venv"
fi
pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)

# torch first and pinned: pip then keeps this CPU build when the package's torch>=2.4 is
# resolved. An unpinned torch would pull a CUDA build of several GB.
step "install torch==2.13.0"
"${pip[@]}" install "torch==2.13.0"

step "install somi-ray in editable mode with the dev extras"
"${pip[@]}" install -e "$repo[dev]"

if [[ "${SKIP_FETCH:-0}" == "1" ]]; then
    step "skip fetching teachers and corpora (SKIP_FETCH=1)"
else
    step "fetch teachers and corpora"
    "$venv/bin/python" -m somi_ray.assets fetch
fi

step "done; activate with: source $venv/bin/activate"
