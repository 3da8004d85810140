#!/usr/bin/env bash
# SLURM: one task per node, all of the node's GPUs per task; JAX discovers the job from SLURM's
# environment (OVSEG_DISTRIBUTED=1 -> jax.distributed.initialize()).
#
#   sbatch launch/slurm_multigpu.sh configs/swinb_vitl_seg.py runs/swinb_vitl_seg
#   sbatch --nodes=4 launch/slurm_multigpu.sh configs/vitl_ft.py runs/vitl_ft --config.optim.lr=1e-5
#
#SBATCH --job-name=ovseg_jax
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
# --signal=TERM@300 gives the trainer 5 minutes to checkpoint before the time limit;
# --requeue with the same WORKDIR resumes from the latest checkpoint.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: sbatch $0 CONFIG WORKDIR [extra flags]" >&2
  exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
PYTHON=${PYTHON:-.venv/bin/python}
export OVSEG_DISTRIBUTED=1
srun --kill-on-bad-exit=1 "$PYTHON" -m ovseg_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
