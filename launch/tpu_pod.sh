#!/usr/bin/env bash
# Cloud TPU VM pod: create the slice, copy this repository to every worker, install, train on all.
#
#   TPU_NAME=ovseg ZONE=us-central2-b ACCELERATOR=v4-32 \
#     launch/tpu_pod.sh configs/swinb_vitl_seg.py gs://BUCKET/runs/swinb_vitl_seg [--config.x=y ...]
#
# Steps (each can be re-run; `create` is skipped if the TPU exists):
#   1. gcloud compute tpus tpu-vm create     (runtime $RUNTIME)
#   2. gcloud compute tpus tpu-vm scp        (this repository -> ~/ovseg_jax on all workers)
#   3. pip install -e . "jax[tpu]"           (on all workers)
#   4. python -m ovseg_jax.train ...         (on all workers; OVSEG_DISTRIBUTED=1 makes JAX find the pod)
# The workdir should be a gs:// path (orbax and the TensorBoard writer accept it) or a shared disk.
# Data and weights named by the config must exist on every worker (or be gs:// paths).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: TPU_NAME=... ZONE=... ACCELERATOR=... $0 CONFIG WORKDIR [extra flags]" >&2
  exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:=v4-32}"
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
REPO=$(cd "$(dirname "$0")/.." && pwd)
tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE"; }

if ! tpu describe "$TPU_NAME" > /dev/null 2>&1; then
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
fi
tar -C "$REPO" --exclude=.venv --exclude=.git --exclude=runs --exclude=outputs -czf /tmp/ovseg_jax.tgz .
tpu scp /tmp/ovseg_jax.tgz "$TPU_NAME":~/ovseg_jax.tgz --worker=all
tpu ssh "$TPU_NAME" --worker=all --command \
  "mkdir -p ~/ovseg_jax && tar -xzf ~/ovseg_jax.tgz -C ~/ovseg_jax && cd ~/ovseg_jax && \
   python3 -m pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
EXTRA=$(printf ' %q' "$@")
tpu ssh "$TPU_NAME" --worker=all --command \
  "cd ~/ovseg_jax && OVSEG_DISTRIBUTED=1 python3 -m ovseg_jax.train --config $CONFIG --workdir $WORKDIR$EXTRA"
