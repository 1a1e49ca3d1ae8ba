#!/usr/bin/env bash
# Run one curriculum stage on this machine with torchrun (CPU ranks with gloo, or one rank per GPU).
#
#   launch/local.sh STAGE [extra megafox-train args...]
#
# Environment:
#   CONFIG             training config (default configs/train/tiny.yaml)
#   NPROC              ranks (default: number of GPUs, else 1)
#   MEGAFOX_OVERRIDES  config overrides, e.g. "checkpoint.dir=/tmp/run data_dir=/data/tiny"
#   LOAD               checkpoint root to start from (--load) when checkpoint.dir has none
#   EXIT_AFTER_MINUTES save and exit 75 after this many minutes
#   MASTER_PORT        rendezvous port (default 29500)
#   PYTHON             interpreter (default .venv/bin/python if present, else python3)
#
# Exit status is megafox-train's (0 done, 75 saved and stopped: run again to continue,
# 2 bad config, 3 halted on NaN, 1 other), not torchrun's, which is 1 for any worker failure.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 STAGE [megafox-train args...]" >&2
    exit 2
fi
STAGE=$1
shift

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
CONFIG=${CONFIG:-configs/train/tiny.yaml}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ "$NPROC" -ge 1 ]] || NPROC=1
fi

args=(--config "$CONFIG" --stage "$STAGE")
[[ -n "${LOAD:-}" ]] && args+=(--load "$LOAD")
[[ -n "${EXIT_AFTER_MINUTES:-}" ]] && args+=(--exit-after-minutes "$EXIT_AFTER_MINUTES")

EXIT_FILE=$(mktemp "${TMPDIR:-/tmp}/megafox-exit.XXXXXX")
trap 'rm -f "$EXIT_FILE"' EXIT
# Forward SIGUSR1/SIGTERM to the ranks (torchrun itself does not pass SIGUSR1 on): they finish
# the step, save and exit 75.
forward() { [[ -n "${TORCHRUN_PID:-}" ]] && pkill -"$1" -P "$TORCHRUN_PID" 2>/dev/null || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM

export MEGAFOX_EXIT_FILE=$EXIT_FILE
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

set +e
"$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" --master-addr 127.0.0.1 \
    --master-port "${MASTER_PORT:-29500}" -m megafox.train "${args[@]}" "$@" &
TORCHRUN_PID=$!
while true; do
    wait "$TORCHRUN_PID"
    rc=$?
    # wait returns >128 when a trapped signal interrupts it; the run is still going
    kill -0 "$TORCHRUN_PID" 2>/dev/null || break
done
set -e

if [[ -s "$EXIT_FILE" ]]; then
    rc=$(<"$EXIT_FILE")
fi
exit "$rc"
