#!/usr/bin/env bash
# Start the local one-node Slurm cluster (idempotent; needs root) and run the Slurm tests:
# a 4-run sweep through the submitit launcher + report, a re-submission that runs only the
# missing/failed runs, and two preempted runs that are requeued and resume (~3-4 min on 2 cores).
#   scripts/slurm_smoke.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
start=../shared/tools/slurm-local/start_slurm.sh
if [ -f "$start" ]; then
  bash "$start"
fi
exec .venv/bin/python -m pytest -q -s -m slurm tests/test_slurm.py "$@"
