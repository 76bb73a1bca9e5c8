#!/usr/bin/env bash
# The main job: set up everything, then absorb the real SmolLM2 teacher into a new SOMI model
# on an embedded loopback-only Ray, learn from the Shakespeare training works and report bits
# per byte on held-out plays next to a unigram baseline and the teacher itself.
#
# Usage: bash scripts/run_main.sh [extra somi-ray absorb options]
# Environment: OUT (checkpoint folder, default runs/main), STEPS (learning steps, default 300).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"

eval "$("$repo/.venv/bin/python" -m somi_ray.assets paths --env)"
cache="$("$repo/.venv/bin/python" -c 'from somi_ray.assets import cache_root; print(cache_root())')"
out="${OUT:-$repo/runs/main}"
rm -rf "$out"
mkdir -p "$(dirname "$out")"

exec "$repo/.venv/bin/somi-ray" absorb \
    --teacher "$SOMI_RAY_SMOLLM2" \
    --corpus "$cache/corpora/shakespeare/train.txt" \
    --probe "shakespeare=$cache/corpora/shakespeare/heldout.txt" \
    --out "$out" \
    --steps "${STEPS:-300}" \
    --hidden 128 --parts 2 --batch-size 8 --seq-len 128 \
    --json "$out.json" \
    "$@"
