#!/usr/bin/env bash
# Runs one gin-configured job on this machine, inside the project's venv.
#
#   launch/local.sh gin_configs/runs/demo.gin runs/demo [--num_processes=2] [--gin.KEY=VALUE ...]
#
# With --num_processes=N it starts N processes that form one JAX job (see
# launch/local.py). The TPU VM, GKE, SLURM and Dataflow launchers (launch/*.py) take
# the same two arguments and pass them through in the same way.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 GIN_FILE MODEL_DIR [--num_processes=N] [--gin.KEY=VALUE ...]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
make -s install
exec .venv/bin/python -m launch.local "$@"
