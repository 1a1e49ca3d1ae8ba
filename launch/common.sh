# The launchers' shared shell: environment, rendezvous, the trainer under srun, signal forwarding
# and requeue. Sourced, never run. The stage scripts end in `megafox_run_stage <stage>`;
# launch/local.sh, launch/curriculum.sh and launch/preprocess.slurm call `megafox_setup_env`, so
# every launcher reads the same variables:
#
#   MEGAFOX_HOME        the megafox checkout (default: the directory above launch/)
#   MEGAFOX_ENV_SETUP   a file sourced first, e.g. `module load cuda/12.4 nccl` + `source venv/bin/activate`
#   MEGAFOX_PYTHON      the python that has megafox installed (default $MEGAFOX_HOME/.venv/bin/python,
#                       else python3 on PATH)
#   MEGAFOX_CONFIG      training YAML (stage scripts / curriculum: configs/train/fox1_1p6b.yaml;
#                       local.sh: configs/train/tiny.yaml); relative paths are relative to the job's
#                       working dir (the submit dir)
#   MEGAFOX_OVERRIDES   "key.sub=value ..." config overrides, read by the trainer itself
#   MEGAFOX_TRAIN_ARGS  extra trainer arguments, e.g. "--load /ckpt/base" (word-split)
#   MEGAFOX_TRAIN_CMD   the whole trainer command instead of "$MEGAFOX_PYTHON -m megafox.train"
#   MEGAFOX_SRUN_ARGS   extra srun arguments, e.g. a container:
#                       "--container-image=/images/megafox.sqsh --container-mounts=/scratch:/scratch"
#   MEGAFOX_MASTER_PORT rendezvous port (SLURM default 20000 + job id % 20000, so jobs sharing a node
#                       differ; local.sh default 29500)
#   MEGAFOX_NPROC       local.sh only: ranks on this machine (default: one per GPU, else 1)
#   MEGAFOX_MAX_REQUEUES  stop requeueing after this many restarts (default 100)
#   MEGAFOX_MAX_FAILURE_RESTARTS  requeue after a failure (a dead or hung rank, a lost node, a failed
#                       rendezvous) at most this many times per job (default 3); counted apart from
#                       the preemption/time-limit requeues, in logs/.megafox-<job id>.failures
#   MEGAFOX_SRUN_WAIT   seconds srun waits, once the first rank has ended, before it kills the rest
#                       (srun --wait; default 30): a dead rank's peers, or a rank stopped or hung
#                       where no signal reaches it, cannot keep the job alive for longer
#   NCCL_* / GLOO_* / TORCH_* / OMP_NUM_THREADS: honoured when set, defaults below otherwise.
# The older names local.sh (CONFIG, NPROC, LOAD, EXIT_AFTER_MINUTES, MASTER_PORT, PYTHON) and
# preprocess.slurm (PYTHON, MEGAFOX_REPO) read still work there, with a notice.
#
# Exit status: the trainer's (0 stage complete, 75 stopped after a save, 2 bad config, 3 NaN halt,
# 4 no usable checkpoint, 5 checkpoint dir in use, 6 hung or lost rank (watchdog), 7 rendezvous
# failed, 1 failure). After a 75 caused by the time-limit warning (SIGUSR1 from
# --signal=B:USR1@lead) or by --exit-after-minutes, the job requeues itself and the next run
# resumes from the checkpoint's `latest`; dependents (--dependency=afterok) keep waiting because
# the job is pending again. After a failure (1, 6, 7, a rank killed by a signal, a lost node) the
# job requeues itself too, at most MEGAFOX_MAX_FAILURE_RESTARTS times, excluding a node that SLURM
# reported failed; a requeue SLURM made itself (NODE_FAIL) counts as a failure restart as well.
# 2, 3, 4, 5 are never requeued (a rerun cannot help), nor is a job stopped by SIGTERM (scancel).
# docs/resilience.md has the details.

megafox_log() { echo "[megafox-launch $(date '+%F %T')] $*"; }

megafox_deprecated() {  # megafox_deprecated OLD NEW: take a pre-MEGAFOX_ variable's value, saying so
  if [ -n "${!1:-}" ] && [ -z "${!2:-}" ]; then
    echo "megafox launch: $1 is deprecated, use $2" >&2
    printf -v "$2" '%s' "${!1}"
  fi
}

megafox_setup_env() {
  if [ -n "${MEGAFOX_ENV_SETUP:-}" ]; then
    # shellcheck disable=SC1090
    source "$MEGAFOX_ENV_SETUP"
  fi
  if [ -z "${MEGAFOX_PYTHON:-}" ]; then
    if [ -x "$MEGAFOX_HOME/.venv/bin/python" ]; then MEGAFOX_PYTHON=$MEGAFOX_HOME/.venv/bin/python
    else MEGAFOX_PYTHON=python3; fi
  fi
  MEGAFOX_CONFIG=${MEGAFOX_CONFIG:-$MEGAFOX_HOME/configs/train/fox1_1p6b.yaml}
  export MEGAFOX_HOME MEGAFOX_PYTHON MEGAFOX_CONFIG
  export MEGAFOX_OVERRIDES=${MEGAFOX_OVERRIDES:-}
  # the trainer must import this checkout even when megafox is not pip-installed in the container
  export PYTHONPATH=$MEGAFOX_HOME${PYTHONPATH:+:$PYTHONPATH}
  export PYTHONUNBUFFERED=1

  # Megatron orders TP/SP communication kernels by launching them on one hardware queue.
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  # a dead peer must abort the job (then requeue/resubmit) rather than hang it until the time limit
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # ranks share the node's cores with the data loader: one BLAS thread pool per CPU of the task
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
}

megafox_rendezvous() {
  local first
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  [ -n "$first" ] || { megafox_log "error: no host in SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"; return 1; }
  export MASTER_ADDR=$first
  export MASTER_PORT=${MEGAFOX_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  # ranks come from srun (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID); stale torchrun variables
  # from the submitting shell would take precedence in megafox.parallel, so drop them
  unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK
}

# Signal plumbing: --signal=B:USR1@lead reaches only this batch shell, so pass it on to srun,
# which delivers it to every task (every rank's trainer). SIGTERM (scancel, preemption, the hard
# time limit) reaches the tasks from SLURM directly; we only note it so that we don't requeue a
# job that is being cancelled.
MEGAFOX_SIGNALLED=""
_megafox_interrupted=0
_megafox_srun_pid=""
_megafox_resender_pid=""
_megafox_forward() {
  _megafox_interrupted=1
  MEGAFOX_SIGNALLED=$1
  if [ "$1" = USR1 ] && [ -n "$_megafox_srun_pid" ]; then
    megafox_log "received SIGUSR1: forwarding it to the trainer (srun pid $_megafox_srun_pid)"
    kill -s USR1 "$_megafox_srun_pid" 2>/dev/null || true
    # A trainer still starting up ignores USR1 (see the srun line), so repeat it until srun ends;
    # a trainer already stopping treats the repeat as the same request.
    if [ -z "$_megafox_resender_pid" ]; then
      ( while sleep "${MEGAFOX_RESIGNAL_SECONDS:-10}"; do
          kill -s USR1 "$_megafox_srun_pid" 2>/dev/null || exit 0
        done ) &
      _megafox_resender_pid=$!
    fi
  else
    megafox_log "received SIG$1"
  fi
}

# The failure-restart counter of this job: "failures expected_restart_count" in a file of the job's
# submit dir (sbatch's --comment belongs to curriculum.sh). A restart count above the expected one
# means SLURM requeued the job itself (a node failure): that is a failure restart too.
_megafox_failures_file() { echo "$PWD/logs/.megafox-$SLURM_JOB_ID.failures"; }
_megafox_read_failures() {
  local f n=0 expect=0
  f=$(_megafox_failures_file)
  [ -s "$f" ] && read -r n expect < "$f"
  local restarts=${SLURM_RESTART_COUNT:-0}
  [ "$restarts" -gt "$expect" ] && n=$((n + restarts - expect))
  echo "$n"
}
_megafox_write_failures() { mkdir -p "$PWD/logs"; echo "$1 $2" > "$(_megafox_failures_file)"; }

_megafox_status_meaning() {
  case $1 in
    1) echo "failure" ;; 2) echo "bad configuration" ;; 3) echo "halted on NaN/inf" ;;
    4) echo "no usable checkpoint" ;; 5) echo "checkpoint directory in use by another run" ;;
    6) echo "a rank hung or was lost (watchdog)" ;; 7) echo "the rendezvous never completed" ;;
    *) if [ "$1" -gt 128 ]; then echo "a rank was killed (signal $(($1 - 128)))"; else echo "failure"; fi ;;
  esac
}

megafox_run_stage() {
  local stage=$1 rc prev failures
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "launch/$stage.slurm: not inside a SLURM job; submit it with sbatch (or use launch/curriculum.sh)," \
         "or run launch/local.sh on one machine" >&2
    return 2
  fi
  megafox_setup_env || return 2
  megafox_rendezvous || return 1
  trap '_megafox_forward USR1' USR1
  trap '_megafox_forward TERM' TERM

  local -a cmd
  if [ -n "${MEGAFOX_TRAIN_CMD:-}" ]; then read -r -a cmd <<< "$MEGAFOX_TRAIN_CMD"
  else cmd=("$MEGAFOX_PYTHON" -m megafox.train); fi
  local -a extra srun_extra
  read -r -a extra <<< "${MEGAFOX_TRAIN_ARGS:-}"
  read -r -a srun_extra <<< "${MEGAFOX_SRUN_ARGS:-}"

  megafox_log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) stage=$stage restart=${SLURM_RESTART_COUNT:-0}" \
              "nodes=$SLURM_JOB_NODELIST tasks=${SLURM_NTASKS:-?} master=$MASTER_ADDR:$MASTER_PORT"
  megafox_log "config=$MEGAFOX_CONFIG overrides='$MEGAFOX_OVERRIDES' cwd=$PWD"
  failures=$(_megafox_read_failures)
  local max_failures=${MEGAFOX_MAX_FAILURE_RESTARTS:-3}
  if [ "$failures" -gt "$max_failures" ]; then
    megafox_log "requeued by SLURM after a failure (e.g. NODE_FAIL): $failures failure restarts," \
                "more than MEGAFOX_MAX_FAILURE_RESTARTS=$max_failures: not running; resubmit after fixing the cause"
    return 1
  fi
  [ "$failures" -gt 0 ] && megafox_log "failure restarts so far: $failures of at most $max_failures"
  # the trainer's own status (rank 0's, or that of the rank whose watchdog stopped the job), which
  # srun's aggregate of all tasks' statuses can hide; rank 0 runs on this node
  export MEGAFOX_EXIT_FILE="$PWD/logs/.megafox-$SLURM_JOB_ID.exit"
  rm -f "$MEGAFOX_EXIT_FILE"
  local srun_err="$PWD/logs/.megafox-$SLURM_JOB_ID.srun"
  # srun (not torchrun) starts one trainer per rank, so a forwarded signal reaches each trainer
  # directly; no --kill-on-bad-exit: it would turn the ranks' common exit 75 into 143. A dead rank
  # ends the others through the collective that fails (gloo) or their watchdog (megafox/watchdog.py);
  # --wait then reaps a rank that cannot end itself (stopped, stuck in a driver call).
  # Each task ignores USR1 until the trainer installs its handler: the default action would kill
  # a rank that is still importing torch when the time-limit warning comes.
  # srun's messages are kept (and still logged) to find a node SLURM reports failed.
  srun --export=ALL --wait="${MEGAFOX_SRUN_WAIT:-30}" "${srun_extra[@]}" bash -c 'trap "" USR1; exec "$@"' megafox-rank \
       "${cmd[@]}" --config "$MEGAFOX_CONFIG" --stage "$stage" "${extra[@]}" 2> >(tee "$srun_err" >&2) &
  _megafox_srun_pid=$!
  # `wait` returns early (status > 128) whenever a trapped signal arrives: wait again until srun ends
  while :; do
    _megafox_interrupted=0
    prev=${rc:-}
    wait "$_megafox_srun_pid"; rc=$?
    if [ "$rc" = 127 ] && [ -n "$prev" ]; then rc=$prev; break; fi   # already reaped by the previous wait
    [ "$_megafox_interrupted" = 1 ] && [ "$rc" -gt 128 ] && continue
    break
  done
  _megafox_srun_pid=""
  if [ -n "$_megafox_resender_pid" ]; then kill "$_megafox_resender_pid" 2>/dev/null; wait "$_megafox_resender_pid" 2>/dev/null; fi
  if [ -s "$MEGAFOX_EXIT_FILE" ]; then
    local own; own=$(head -c 16 "$MEGAFOX_EXIT_FILE" | tr -dc 0-9)
    [ -n "$own" ] && [ "$own" != "$rc" ] && megafox_log "srun exited with status $rc, the trainer with $own"
    [ -n "$own" ] && rc=$own
  fi
  rm -f "$MEGAFOX_EXIT_FILE"
  sleep 0.5  # tee's last lines
  # nodes SLURM itself reported failed ("srun: error: Node failure on n2")
  _megafox_bad_nodes=$(sed -n 's/.*Node failure on \([^ ]*\).*/\1/p' "$srun_err" 2>/dev/null | sort -u | paste -sd, -)
  rm -f "$srun_err"
  megafox_log "trainer exited with status $rc"

  if [ "$rc" = 75 ]; then
    if [ "$MEGAFOX_SIGNALLED" = TERM ]; then
      megafox_log "stopped by SIGTERM (cancelled, preempted or past the time limit): not requeueing;" \
                  "resubmit to resume from the checkpoint"
      return 75
    fi
    local restarts=${SLURM_RESTART_COUNT:-0} max=${MEGAFOX_MAX_REQUEUES:-100}
    if [ "$restarts" -ge "$max" ]; then
      megafox_log "already restarted $restarts times (MEGAFOX_MAX_REQUEUES=$max): not requeueing"
      return 75
    fi
    megafox_log "checkpoint saved: requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
    _megafox_write_failures "$failures" $((restarts + 1))
    if scontrol requeue "$SLURM_JOB_ID"; then
      # SLURM now ends this run; leave before it has to kill us
      return 75
    fi
    megafox_log "scontrol requeue failed: resubmit this job to resume from the checkpoint"
    return "$rc"
  fi
  case $rc in
    0) rm -f "$(_megafox_failures_file)"; return 0 ;;
    2|3|4|5)
      megafox_log "status $rc ($(_megafox_status_meaning "$rc")) is not retryable: not requeueing"
      return "$rc" ;;
  esac
  if [ "$MEGAFOX_SIGNALLED" = TERM ]; then
    megafox_log "stopped by SIGTERM (cancelled or preempted): not requeueing"
    return "$rc"
  fi
  _megafox_requeue_after_failure "$rc" "$failures" "$max_failures"
  return "$rc"
}

_megafox_bad_nodes=""
_megafox_requeue_after_failure() { # status failures max
  local rc=$1 failures=$2 max=$3 restarts=${SLURM_RESTART_COUNT:-0} bad=$_megafox_bad_nodes
  if [ "$failures" -ge "$max" ]; then
    megafox_log "status $rc ($(_megafox_status_meaning "$rc")): already $failures failure restarts" \
                "(MEGAFOX_MAX_FAILURE_RESTARTS=$max): not requeueing; fix the cause and resubmit"
    return 0
  fi
  megafox_log "status $rc ($(_megafox_status_meaning "$rc")): requeueing job $SLURM_JOB_ID" \
              "(failure restart $((failures + 1)) of at most $max)${bad:+, excluding failed node(s) $bad}"
  _megafox_write_failures $((failures + 1)) $((restarts + 1))
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    megafox_log "scontrol requeue failed: resubmit this job to resume from the checkpoint"
    return 0
  fi
  if [ -n "$bad" ]; then
    local old; old=$(scontrol show job -o "$SLURM_JOB_ID" | sed -n 's/.*ExcNodeList=\([^ ]*\).*/\1/p')
    [ "$old" = "(null)" ] && old=""
    scontrol update JobId="$SLURM_JOB_ID" ExcNodeList="${old:+$old,}$bad" ||
      megafox_log "could not exclude $bad from the requeued job"
  fi
}
