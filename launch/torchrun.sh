#!/usr/bin/env bash
# One node's share of a `moeut train` run under torchrun. Run it on every node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#     launch/torchrun.sh launch/configs/moeut-244m.yaml [key=value ...]
# or, with a rendezvous endpoint instead of a fixed node rank:
#   NNODES=2 RDZV_ENDPOINT=node0:29500 launch/torchrun.sh CONFIG [key=value ...]
# MAX_RESTARTS (default 3): workers are restarted this often after a failure; each restart
# resumes from the latest complete checkpoint (`checkpoint.resume: auto`).
set -euo pipefail
die() { echo "torchrun.sh: $*" >&2; exit 2; }

CONFIG=${1:-}
[[ -n $CONFIG ]] || die "usage: torchrun.sh CONFIG.yaml [key=value ...]"
[[ -f $CONFIG ]] || die "config $CONFIG not found"
shift
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}
MAX_RESTARTS=${MAX_RESTARTS:-3}
# Restarted workers must not read the previous attempt's addresses from a rendezvous store
# shared across attempts (pytorch/pytorch#135712). On one node the trainer keeps the attempts
# apart itself; agents on several nodes count restarts apart, so there the store must not be
# shared.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

if [[ -n ${RDZV_ENDPOINT:-} ]]; then
  RDZV=(--rdzv-backend=c10d "--rdzv-endpoint=$RDZV_ENDPOINT" "--rdzv-id=${RDZV_ID:-moeut}")
elif [[ $NNODES == 1 ]]; then
  RDZV=(--rdzv-backend=c10d --rdzv-endpoint=localhost:${MASTER_PORT:-29500} --rdzv-id=moeut)
else
  : "${NODE_RANK:?set NODE_RANK (0..NNODES-1), or RDZV_ENDPOINT}"
  : "${MASTER_ADDR:?set MASTER_ADDR (the node-rank-0 host), or RDZV_ENDPOINT}"
  : "${MASTER_PORT:?set MASTER_PORT, or RDZV_ENDPOINT}"
  RDZV=(--node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT")
fi

CMD=(torchrun --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" "${RDZV[@]}"
     --max-restarts="$MAX_RESTARTS" -m moeut_dist.cli train --config "$CONFIG" "$@")
echo "+ TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 ${CMD[*]}"
exec "${CMD[@]}"
