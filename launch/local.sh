#!/usr/bin/env bash
# Run one curriculum stage on this machine with torchrun (CPU ranks with gloo, or one rank per GPU).
#
#   launch/local.sh STAGE [extra megafox-train args...]
#
# Environment: the launchers' common variables (launch/common.sh): MEGAFOX_CONFIG (default
# configs/train/tiny.yaml here), MEGAFOX_NPROC (default: one rank per GPU, else 1),
# MEGAFOX_OVERRIDES, MEGAFOX_TRAIN_ARGS (e.g. "--load /ckpt/base --exit-after-minutes 60"),
# MEGAFOX_MASTER_PORT (default 29500), MEGAFOX_PYTHON, MEGAFOX_TRAIN_CMD, MEGAFOX_ENV_SETUP.
# Older names (CONFIG, NPROC, LOAD, EXIT_AFTER_MINUTES, MASTER_PORT, PYTHON) still work, with a notice.
#
# Exit status is megafox-train's (0 done, 75 saved and stopped: run again to continue,
# 2 bad config, 3 halted on NaN, 4 no usable checkpoint, 5 checkpoint dir in use, 1 other), not
# torchrun's, which is 1 for any worker failure.
# Ctrl-C: the ranks finish their step, save and exit 75 (run again to resume); a second Ctrl-C
# stops them at once without saving (exit 130; the last complete checkpoint stays intact).
# If this script is killed (kill -9, a dead login shell), the ranks notice their parent is gone
# and exit within a second rather than keep training unattended.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 STAGE [megafox-train args...]" >&2
    exit 2
fi
STAGE=$1
shift

MEGAFOX_HOME=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$MEGAFOX_HOME"
# shellcheck source=launch/common.sh
source "$MEGAFOX_HOME/launch/common.sh"
for old in CONFIG NPROC MASTER_PORT PYTHON; do megafox_deprecated "$old" "MEGAFOX_$old"; done
extra=()
[[ -n "${MEGAFOX_TRAIN_ARGS:-}" ]] && read -r -a extra <<< "$MEGAFOX_TRAIN_ARGS"
if [[ -n "${LOAD:-}" ]]; then
    echo "megafox launch: LOAD is deprecated, use MEGAFOX_TRAIN_ARGS=\"--load DIR\"" >&2
    extra+=(--load "$LOAD")
fi
if [[ -n "${EXIT_AFTER_MINUTES:-}" ]]; then
    echo "megafox launch: EXIT_AFTER_MINUTES is deprecated, use MEGAFOX_TRAIN_ARGS=\"--exit-after-minutes M\"" >&2
    extra+=(--exit-after-minutes "$EXIT_AFTER_MINUTES")
fi
MEGAFOX_CONFIG=${MEGAFOX_CONFIG:-configs/train/tiny.yaml}
megafox_setup_env
if [[ -z "${MEGAFOX_NPROC:-}" ]]; then
    MEGAFOX_NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ "$MEGAFOX_NPROC" -ge 1 ]] || MEGAFOX_NPROC=1
fi
cmd=("$MEGAFOX_PYTHON" -m megafox.train)
[[ -n "${MEGAFOX_TRAIN_CMD:-}" ]] && read -r -a cmd <<< "$MEGAFOX_TRAIN_CMD"

EXIT_FILE=$(mktemp "${TMPDIR:-/tmp}/megafox-exit.XXXXXX")
trap 'rm -f "$EXIT_FILE"' EXIT
# The ranks run in sessions of their own (torchrun starts them so), so signals are forwarded to
# them here: SIGUSR1/SIGTERM/first Ctrl-C -> finish the step, save, exit 75. torchrun does not pass
# SIGUSR1 on, and must not act on Ctrl-C itself (it would kill the ranks mid-save).
forward() { [[ -n "${TORCHRUN_PID:-}" ]] && pkill -"$1" -P "$TORCHRUN_PID" 2>/dev/null || true; }
interrupted=0
on_interrupt() {
    interrupted=$((interrupted + 1))
    if [[ $interrupted -eq 1 ]]; then
        echo "launch/local.sh: interrupted: the ranks save and stop after this step (Ctrl-C again to stop without saving)" >&2
        forward TERM
    else
        echo "launch/local.sh: stopping now without saving" >&2
        forward KILL
        kill -KILL "$TORCHRUN_PID" 2>/dev/null || true
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap on_interrupt INT

export MEGAFOX_EXIT_FILE=$EXIT_FILE
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

set +e
"$MEGAFOX_PYTHON" -m megafox.torchrun --nproc-per-node "$MEGAFOX_NPROC" --master-addr 127.0.0.1 \
    --master-port "${MEGAFOX_MASTER_PORT:-29500}" --signals-to-handle SIGTERM,SIGHUP,SIGQUIT --no-python \
    "${cmd[@]}" --config "$MEGAFOX_CONFIG" --stage "$STAGE" ${extra[@]+"${extra[@]}"} "$@" &
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
elif [[ $interrupted -gt 1 ]]; then
    rc=130
fi
exit "$rc"
