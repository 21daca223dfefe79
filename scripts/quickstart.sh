#!/usr/bin/env bash
# Set-up, then the quickstart sweep on a local Ray: runs/quickstart/results.parquet and report/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/instill run configs/quickstart.yaml --out "${OUT:-runs/quickstart}" "$@"
