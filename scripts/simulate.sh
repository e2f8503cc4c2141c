#!/usr/bin/env bash
# Set up (first time) and run the default simulation: 5 organisations on the real movies data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/fedembed simulate --task movies --orgs 5 --rounds 10 --out runs/movies "$@"
