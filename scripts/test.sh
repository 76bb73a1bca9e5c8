#!/usr/bin/env bash
# The test command: set up everything (virtual environment, real teachers, corpora), then run
# the whole test suite, fast unit tests and the slower integration tests on real teachers.
#
# Usage: bash scripts/test.sh [extra pytest options]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
cd "$repo"
# The real-teacher tests find the fetched GGUF files through these variables.
eval "$("$repo/.venv/bin/python" -m somi_ray.assets paths --env)"
exec "$repo/.venv/bin/python" -m pytest -q "$@"
