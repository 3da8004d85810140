#!/usr/bin/env bash
# Several training processes on this machine, coordinated over 127.0.0.1 (tests multi-host code paths).
#
#   launch/local_multiprocess.sh NUM_PROCESSES CONFIG WORKDIR [--config.x=y ...]
#   CPU_DEVICES_PER_PROCESS=2 launch/local_multiprocess.sh 2 configs/synthetic.py:clip_ft runs/mp
#
# Each process gets OVSEG_COORDINATOR / OVSEG_NUM_PROCESSES / OVSEG_PROCESS_ID (read by
# ovseg_jax.training.sharding.initialize_distributed). With CPU_DEVICES_PER_PROCESS set, processes run on
# CPU with that many simulated devices each; with GPUs, process i sees GPU i only.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES CONFIG WORKDIR [extra flags]" >&2
  exit 2
fi
NUM=$1; CONFIG=$2; WORKDIR=$3; shift 3
PYTHON=${PYTHON:-.venv/bin/python}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
mkdir -p "$WORKDIR"
pids=()
for ((i = 0; i < NUM; i++)); do
  env_vars=(OVSEG_COORDINATOR="127.0.0.1:$PORT" OVSEG_NUM_PROCESSES="$NUM" OVSEG_PROCESS_ID="$i")
  if [ -n "${CPU_DEVICES_PER_PROCESS:-}" ]; then
    env_vars+=(JAX_PLATFORMS=cpu
      XLA_FLAGS="--xla_force_host_platform_device_count=$CPU_DEVICES_PER_PROCESS --xla_cpu_enable_concurrency_optimized_scheduler=false")
  else
    env_vars+=(CUDA_VISIBLE_DEVICES="$i")
  fi
  env "${env_vars[@]}" "$PYTHON" -m ovseg_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@" \
    > "$WORKDIR/process_$i.log" 2>&1 &
  pids+=($!)
done
# Forward SIGTERM/SIGINT so every process checkpoints and stops at the same step.
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
echo "logs: $WORKDIR/process_*.log"
exit $status
