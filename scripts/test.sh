#!/usr/bin/env bash
# Set-up, then the test suite (hermetic, CPU-only; GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/instill check-claims docs/*.md README.md
exec .venv/bin/python -m pytest -q "$@"
