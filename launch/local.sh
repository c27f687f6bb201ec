#!/usr/bin/env bash
# Runs one gin-configured job on this machine, inside the project's venv.
#
#   launch/local.sh gin_configs/runs/demo.gin runs/demo [--gin.KEY=VALUE ...]
#
# The TPU-pod, GKE and SLURM launchers take the same two arguments and pass
# them through in the same way.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 GIN_FILE MODEL_DIR [--gin.KEY=VALUE ...]" >&2
  exit 2
fi
gin_file=$1 model_dir=$2
shift 2
cd "$(dirname "$0")/.."
make -s install
exec .venv/bin/python -m cm3leon_jax.main --gin_file="$gin_file" \
  --gin.MODEL_DIR="'$model_dir'" "$@"
