#!/usr/bin/env bash
# A `moeut train` run started by the DeepSpeed launcher over the hosts of a hostfile
# ("host slots=N" per line; passwordless ssh between them):
#   HOSTFILE=hosts.txt launch/deepspeed.sh launch/configs/moeut-244m.yaml [key=value ...]
# MASTER_ADDR / MASTER_PORT default to the first host and 29500. The launcher restarts nothing;
# rerun the same command to continue from the latest complete checkpoint.
set -euo pipefail
die() { echo "deepspeed.sh: $*" >&2; exit 2; }

CONFIG=${1:-}
[[ -n $CONFIG ]] || die "usage: deepspeed.sh CONFIG.yaml [key=value ...]"
[[ -f $CONFIG ]] || die "config $CONFIG not found"
shift
: "${HOSTFILE:?set HOSTFILE (lines of 'hostname slots=N')}"
[[ -f $HOSTFILE ]] || die "hostfile $HOSTFILE not found"
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}

# --no_local_rank: the trainer reads LOCAL_RANK from the environment, not from its arguments.
CMD=(deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     --no_local_rank --module moeut_dist.cli train --config "$CONFIG" "$@")
echo "+ ${CMD[*]}"
exec "${CMD[@]}"
