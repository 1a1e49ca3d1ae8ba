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
#   NCCL_* / GLOO_* / TORCH_* / OMP_NUM_THREADS: honoured when set, defaults below otherwise.
# The older names local.sh (CONFIG, NPROC, LOAD, EXIT_AFTER_MINUTES, MASTER_PORT, PYTHON) and
# preprocess.slurm (PYTHON, MEGAFOX_REPO) read still work there, with a notice.
#
# Exit status: the trainer's (0 stage complete, 75 stopped after a save, 2 bad config, 3 NaN halt,
# 4 no usable checkpoint, 5 checkpoint dir in use, 1 failure). After a 75 caused by the time-limit
# warning (SIGUSR1 from --signal=B:USR1@lead) or by --exit-after-minutes, the job requeues itself
# and the next run resumes from the checkpoint's `latest`; dependents (--dependency=afterok) keep
# waiting because the job is pending again. Any other status is final: no requeue.

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

megafox_run_stage() {
  local stage=$1 rc prev
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
  # srun (not torchrun) starts one trainer per rank, so a forwarded signal reaches each trainer
  # directly; no --kill-on-bad-exit: it would turn the ranks' common exit 75 into 143.
  # Each task ignores USR1 until the trainer installs its handler: the default action would kill
  # a rank that is still importing torch when the time-limit warning comes.
  srun --export=ALL "${srun_extra[@]}" bash -c 'trap "" USR1; exec "$@"' megafox-rank \
       "${cmd[@]}" --config "$MEGAFOX_CONFIG" --stage "$stage" "${extra[@]}" &
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
    if scontrol requeue "$SLURM_JOB_ID"; then
      # SLURM now ends this run; leave before it has to kill us
      return 75
    fi
    megafox_log "scontrol requeue failed: resubmit this job to resume from the checkpoint"
  fi
  return "$rc"
}
