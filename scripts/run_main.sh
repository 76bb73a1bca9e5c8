#!/usr/bin/env bash
# The main job: set up everything, then absorb the three real teachers (SmolLM2, Gemma 3 270M,
# Qwen2.5-Coder 0.5B) in parallel TeacherActors into a new SOMI model on an embedded
# loopback-only Ray, through their weights and their next-token outputs (64 cached windows per
# teacher), learn from the Shakespeare training works, and report bits per byte on
# held-out Shakespeare and Python documentation after each event, next to a unigram baseline,
# SOMI from random initialisation trained for the same steps, and the teachers themselves.
#
# Usage: bash scripts/run_main.sh [extra somi-ray absorb options]
# Environment: OUT (checkpoint folder, default runs/main), STEPS (learning steps after the last
# teacher, default 120).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"

eval "$("$repo/.venv/bin/python" -m somi_ray.assets paths --env)"
cache="$("$repo/.venv/bin/python" -c 'from somi_ray.assets import cache_root; print(cache_root())')"
out="${OUT:-$repo/runs/main}"
rm -rf "$out" "$out-random-init"
mkdir -p "$(dirname "$out")"

exec "$repo/.venv/bin/somi-ray" absorb \
    --teacher "$SOMI_RAY_SMOLLM2" \
    --teacher "$SOMI_RAY_GEMMA3" \
    --teacher "$SOMI_RAY_QWEN_CODER" \
    --corpus "$cache/corpora/shakespeare/train.txt" \
    --probe "shakespeare=$cache/corpora/shakespeare/heldout.txt" \
    --probe "python-docs=$cache/corpora/python-docs/heldout.txt" \
    --out "$out" \
    --mode both --distill-windows 64 \
    --steps "${STEPS:-120}" --between-steps 20 --random-baseline \
    --hidden 128 --parts 2 --batch-size 8 --seq-len 128 \
    --eval-bytes 30000 --teacher-eval-bytes 8000 \
    --json "$out.json" \
    "$@"
