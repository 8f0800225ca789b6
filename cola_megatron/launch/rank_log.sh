#!/usr/bin/env bash
# One training process as launch/train.sh has torchrun start it: its output is appended to
# LOG_DIR/rankNNNNN.log (NNNNN: the global rank), and global rank 0's output also goes to the console.
#
#   rank_log.sh PYTHON ARGS...      (torchrun sets RANK; launch/train.sh sets LOG_DIR)
set -euo pipefail
: "${RANK:?is set by torchrun}" "${LOG_DIR:?is set by launch/train.sh}"

log=$(printf '%s/rank%05d.log' "$LOG_DIR" "$RANK")
printf '==== %s host %s pid %d: %s\n' "$(date '+%F %T')" "$(hostname)" "$$" "$*" >>"$log"
if [[ "$RANK" == 0 ]]; then
    # tee keeps the SIGTERM-ignoring disposition it inherits, so a stopping run's last messages still get through.
    exec > >(tee -a "$log") 2>&1
else
    exec >>"$log" 2>&1
fi

# torchrun was started with SIGTERM and SIGINT ignored, which bash cannot undo: restore SIGINT's default in a small
# Python step, then become the training process. SIGTERM stays ignored until cola-train installs its handler, first
# thing, so that a stop during start-up never kills it (launch/train.sh passes such a stop on afterwards).
python=$1
shift
exec "$python" -c 'import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])' "$@"
