#!/usr/bin/env bash
# Launch cola-train with torchrun on this node: one node, or one of several.
#
#   launch/train.sh CONFIG [section.key=value ...]
#
# Run it once on every node (Slurm and Kubernetes templates: launch/slurm/, launch/k8s/). Environment:
#   NPROC_PER_NODE  processes on this node (default: the visible GPUs; required on a CPU-only machine)
#   NNODES          number of nodes (default 1; with c10d rendezvous also MIN:MAX)
#   NODE_RANK       this node's index, 0 .. NNODES-1 (default 0; not used with c10d rendezvous)
#   MASTER_ADDR     host of node 0 (default 127.0.0.1)          MASTER_PORT  its free TCP port (default 29500)
#   RDZV_ENDPOINT   HOST:PORT: use torchrun's c10d rendezvous instead (ranks assigned on arrival); RDZV_ID names it
#   LOG_DIR         per-rank logs LOG_DIR/rankNNNNN.log (default logs/CONFIG-NAME); rank 0 is also on the console
#   PYTHON          interpreter with cola-megatron installed (default: .venv/bin/python of this checkout, else python3)
#   MAX_RESTARTS    torchrun restarts of the whole node after a failure (default 0)
#   STOPPED_EXIT_CODE  exit status after a stop before train.train_iters (default 0; 143 for Kubernetes)
# Kubeflow's PET_NNODES, PET_NODE_RANK and PET_NPROC_PER_NODE are used when the variables above are unset.
#
# SIGTERM or SIGINT (Kubernetes eviction, Ctrl-C, kill) reaches every training process on this node once: they
# finish the iteration, save a checkpoint (when checkpoint.save_dir is set) and exit 0; this script then exits
# STOPPED_EXIT_CODE. torchrun ignores SIGTERM so that it waits for that save instead of killing the workers. A
# stop that comes while the processes start is passed on once they can take it. Inside a Slurm job step (srun)
# Slurm signals every process of the step itself, so nothing is forwarded then.
set -euo pipefail

usage() {
    sed -n '2,22s/^# \{0,1\}//p' "$0"
}

die() {
    echo "launch/train.sh: $*" >&2
    exit 2
}

if [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]]; then
    usage
    exit 0
elif [[ $# -lt 1 ]]; then
    usage >&2
    exit 2
fi
CONFIG=$1
shift
# A stop asked for before the training processes can take it is passed on to them once they can (see below).
stop_pending=
trap 'stop_pending=1' TERM
[[ -f "$CONFIG" ]] || die "config file '$CONFIG' does not exist; pass a YAML file such as configs/demo.yaml"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null || die "python interpreter '$PYTHON' not found; set PYTHON=/path/to/python"

# --- Cluster shape ------------------------------------------------------------------------------------------

NNODES=${NNODES:-${PET_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${PET_NODE_RANK:-0}}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-${PET_NPROC_PER_NODE:-}}

gpu_count() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        local -a visible
        IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#visible[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

gpus=$(gpu_count)
if [[ -z "$NPROC_PER_NODE" ]]; then
    [[ "$gpus" -gt 0 ]] || die "no GPU found: set NPROC_PER_NODE to the number of CPU processes to run on this node" \
        "(training then uses gloo on the CPU)"
    NPROC_PER_NODE=$gpus
fi
[[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE='$NPROC_PER_NODE' is not a positive integer"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] || die "NODE_RANK='$NODE_RANK' is not a node index"
STOPPED_EXIT_CODE=${STOPPED_EXIT_CODE:-0}
[[ "$STOPPED_EXIT_CODE" =~ ^[0-9]+$ && "$STOPPED_EXIT_CODE" -le 255 ]] ||
    die "STOPPED_EXIT_CODE='$STOPPED_EXIT_CODE' is not an exit status 0-255"
world_size=
if [[ "$NNODES" =~ ^[1-9][0-9]*$ ]]; then
    world_size=$((NNODES * NPROC_PER_NODE))
    [[ "$NODE_RANK" -lt "$NNODES" ]] || die "NODE_RANK=$NODE_RANK is not below NNODES=$NNODES"
elif [[ ! "$NNODES" =~ ^[1-9][0-9]*:[1-9][0-9]*$ || -z "${RDZV_ENDPOINT:-}" ]]; then
    die "NNODES='$NNODES' must be a node count (MIN:MAX only with RDZV_ENDPOINT set)"
fi

# --- Validate the config before starting anything (one clear error instead of N failing ranks) -------------

# Prints the tensor-parallel size; exits 2 with the config error.
# shellcheck disable=SC2016  # ignoring SIGTERM: a stop (Slurm signals the whole step) must not look like a bad config
tensor_parallel=$(trap '' TERM; exec "$PYTHON" - "$CONFIG" "$world_size" "$@" <<'EOF'
import sys

from cola_megatron.config import ConfigError, load_config

path, world_size, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
try:
    cfg = load_config(path, overrides, world_size=int(world_size) if world_size else None)
except ConfigError as e:
    print(f"launch/train.sh: error: {e}", file=sys.stderr)
    sys.exit(2)
print(cfg.parallel.tensor_parallel)
EOF
) || exit 2

# --- Environment --------------------------------------------------------------------------------------------

if [[ "$gpus" -gt 0 ]]; then
    # Megatron orders tensor-parallel communication before compute through a single hardware queue; Blackwell
    # (compute capability 10+) no longer needs it and runs better without.
    cc_major=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | cut -d. -f1 || true)
    if [[ "$tensor_parallel" -gt 1 && "${cc_major:-0}" =~ ^[0-9]+$ && "${cc_major:-0}" -lt 10 ]]; then
        export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    fi
    # Fragmentation from varying activation shapes otherwise costs GiBs at the memory limit.
    if [[ -z "${PYTORCH_CUDA_ALLOC_CONF:-}" && -z "${PYTORCH_ALLOC_CONF:-}" ]]; then
        export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    fi
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # Fail a collective that errors or hangs (then torchrun stops the job) instead of waiting forever.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # Megatron's overlapped gradient reduction frees buffers sooner without record_stream.
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
fi
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores=$(nproc 2>/dev/null || echo 1)
    threads=$((cores / NPROC_PER_NODE))
    export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
fi
export PYTHONUNBUFFERED=1

config_name=$(basename "$CONFIG")
export LOG_DIR=${LOG_DIR:-logs/${config_name%.*}}
mkdir -p "$LOG_DIR"

# --- torchrun -----------------------------------------------------------------------------------------------

torchrun_args=(--nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --max-restarts "${MAX_RESTARTS:-0}")
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    torchrun_args+=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-cola-megatron}")
else
    torchrun_args+=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
fi
# A torchrun with --signals-to-handle (recent PyTorch) leaves SIGTERM to the workers; older ones forward it and kill
# the workers 30 s later.
if "$PYTHON" -c 'import sys, dataclasses; from torch.distributed.launcher.api import LaunchConfig
sys.exit(0 if "signals_to_handle" in {f.name for f in dataclasses.fields(LaunchConfig)} else 1)' 2>/dev/null; then
    torchrun_args+=(--signals-to-handle "SIGHUP,SIGQUIT")
fi

node="node $NODE_RANK of $NNODES"
[[ -n "${RDZV_ENDPOINT:-}" ]] && node="$NNODES nodes, rendezvous at $RDZV_ENDPOINT"
echo "launch/train.sh: $node, $NPROC_PER_NODE processes, config $CONFIG, logs in $LOG_DIR/" >&2

# Each training process that stops before train.train_iters touches this file (cola-train reads the variable).
stopped_marker=$(mktemp "${TMPDIR:-/tmp}/cola-stopped.XXXXXX")
rm -f "$stopped_marker"
export COLA_STOPPED_MARKER=$stopped_marker

# torchrun runs in the background with SIGTERM and SIGINT ignored (inherited by it; rank_log.sh restores SIGINT and
# cola-train installs its SIGTERM handler first thing), so a signal to this script or to the whole job reaches the
# workers and only them, and never kills one that is still starting.
(
    trap '' TERM INT
    exec "$PYTHON" -m torch.distributed.run "${torchrun_args[@]}" --no-python \
        "$here/rank_log.sh" "$PYTHON" -m cola_megatron.train --config "$CONFIG" "$@"
) &
launcher=$!

# shellcheck disable=SC2317  # the functions below run from the traps
workers() {
    if [[ -r "/proc/$launcher/task/$launcher/children" ]]; then
        cat "/proc/$launcher/task/$launcher/children"
    else
        pgrep -P "$launcher" || true
    fi
}

# Whether a process has a SIGTERM handler installed (bit 15 of SigCgt): a training process past its first steps.
# shellcheck disable=SC2317
catches_sigterm() {
    local mask
    mask=$(awk '/^SigCgt:/ { print $2 }' "/proc/$1/status" 2>/dev/null) || return 1
    [[ -n "$mask" ]] && (((16#$mask >> 14) & 1))
}

# One SIGTERM to each training process that can take it; the ranks agree on the stop, so reaching one is enough.
# Inside a Slurm job step Slurm has signalled every process of the step itself: then only when none could take it.
# shellcheck disable=SC2317
request_stop() {
    local pid ready=()
    for pid in $(workers); do
        if catches_sigterm "$pid"; then ready+=("$pid"); fi
    done
    if [[ ${#ready[@]} -eq 0 ]]; then
        stop_pending=1  # none started yet: ask again below, once one can take it
        return
    fi
    stop_pending=
    if [[ -n "${SLURM_STEP_ID:-}" && "$1" == slurm ]]; then
        echo "launch/train.sh: SIGTERM received: Slurm delivers it to the training processes of this job step" >&2
        return
    fi
    echo "launch/train.sh: stop requested: sending SIGTERM to the training processes on this node" >&2
    kill -s TERM "${ready[@]}" 2>/dev/null || true
}

interrupts=0
# shellcheck disable=SC2317
interrupt_workers() {
    local signal=INT
    ((++interrupts > 1)) && signal=KILL  # a second Ctrl-C: stop now, without the checkpoint
    [[ -n "${SLURM_STEP_ID:-}" ]] && return  # srun forwards Ctrl-C to every process of the step
    echo "launch/train.sh: SIGINT received: sending SIG$signal to the training processes on this node" >&2
    # shellcheck disable=SC2046
    kill -s "$signal" $(workers) 2>/dev/null || true
}
trap 'request_stop slurm' TERM
trap interrupt_workers INT
# A SIGTERM that came before torchrun started reached no training process.
[[ -n "$stop_pending" ]] && stop_pending=forward

# Wait for torchrun, waking up to pass on a stop that no training process could take yet. `wait` returns early when
# a trapped signal arrives (bash then leaves the script under `set -e` even in a `||` list): no errexit from here.
set +e
while kill -0 "$launcher" 2>/dev/null; do
    if [[ -n "$stop_pending" ]]; then request_stop forward; fi
    (trap '' TERM INT; exec sleep 0.5) &
    wait "$!" 2>/dev/null
done
status=0
while true; do
    wait "$launcher"
    status=$?
    kill -0 "$launcher" 2>/dev/null || break
done

stopped=0
if [[ -e "$stopped_marker" ]]; then
    stopped=1
    rm -f "$stopped_marker"
fi
if [[ "$status" -ne 0 ]]; then
    echo "launch/train.sh: training failed (exit $status); per-rank logs: $LOG_DIR/rank*.log" >&2
elif [[ "$stopped" == 1 ]]; then
    echo "launch/train.sh: training stopped before its last iteration; exit $STOPPED_EXIT_CODE" >&2
    status=$STOPPED_EXIT_CODE
fi
exit "$status"
