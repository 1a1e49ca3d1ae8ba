#!/usr/bin/env bash
# Submit the whole curriculum: stage1 -> stage2 -> stage3, each waiting for the previous one to
# finish successfully (--dependency=afterok) and cancelled if it fails (--kill-on-invalid-dep=yes).
#
#   launch/curriculum.sh [sbatch options applied to every stage...]
#   e.g. MEGAFOX_CONFIG=configs/train/fox1_1p6b.yaml launch/curriculum.sh --account=proj --partition=gpu
#
# Run it from the directory the jobs should run in (normally the repository root): relative paths
# in the config (checkpoint.dir, data_dir) and logs/ are relative to it.
# Prints one line per stage on stdout, "<stage> <job id>" or "<stage> done", in order.
# Safe to rerun: a stage whose <checkpoint.dir>/<stage>.done exists is skipped, and a stage that
# is still queued or running from an earlier submission (same checkpoint.dir) is reused, not
# submitted twice. After a failure, fix the cause and rerun: training resumes from `latest`.
# Environment: as for the stage scripts (launch/common.sh): MEGAFOX_CONFIG, MEGAFOX_OVERRIDES,
# MEGAFOX_PYTHON, MEGAFOX_ENV_SETUP, ...; MEGAFOX_STAGES (default "stage1 stage2 stage3").
set -euo pipefail

MEGAFOX_HOME=${MEGAFOX_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# shellcheck source=launch/common.sh
source "$MEGAFOX_HOME/launch/common.sh"
megafox_setup_env
STAGES=${MEGAFOX_STAGES:-stage1 stage2 stage3}
command -v sbatch >/dev/null || { echo "curriculum.sh: sbatch not found (not on a SLURM login node?)" >&2; exit 2; }

# The trainer's own loader reads the config with the overrides, so a bad config fails here,
# before anything is queued, and checkpoint.dir is exactly the one the trainer will use.
stage_args=()
for stage in $STAGES; do stage_args+=(--stage "$stage"); done
ckpt=$("$MEGAFOX_PYTHON" -m megafox.records checkpoint-dir --config "$MEGAFOX_CONFIG" "${stage_args[@]}") || exit 2

# Which stages are complete, read before anything is queued: a .done record that cannot be read
# (the records CLI has said which file and field) stops the submission rather than re-running a stage.
declare -A complete=()
for stage in $STAGES; do
  rc=0
  "$MEGAFOX_PYTHON" -m megafox.records stage-done --checkpoint-dir "$ckpt" --stage "$stage" >/dev/null || rc=$?
  case $rc in
    0) complete[$stage]=1 ;;
    1) ;;
    *) echo "curriculum: nothing submitted; fix or move $ckpt/$stage.done" >&2; exit 2 ;;
  esac
done

mkdir -p logs   # the stage scripts write logs/%x-%j.out; SLURM does not create the directory
me=$(id -un)
prev=""
for stage in $STAGES; do
  if [ -n "${complete[$stage]:-}" ]; then
    echo "$stage: already complete ($ckpt/$stage.done), skipped" >&2
    echo "$stage done"
    prev=""
    continue
  fi
  tag="megafox:$ckpt:$stage"
  job=$(squeue -h -u "$me" -t PENDING,RUNNING,REQUEUED,SUSPENDED,CONFIGURING -o '%i %k' 2>/dev/null |
        awk -v t="$tag" '$2 == t {print $1; exit}')
  if [ -n "$job" ]; then
    echo "$stage: job $job from an earlier submission is still queued or running; reusing it" >&2
  else
    dep=()
    [ -n "$prev" ] && dep=(--dependency="afterok:$prev" --kill-on-invalid-dep=yes)
    job=$(sbatch --parsable --export=ALL --comment="$tag" ${dep[@]+"${dep[@]}"} "$@" "$MEGAFOX_HOME/launch/$stage.slurm")
    job=${job%%;*}
    echo "$stage: submitted job $job${prev:+ (after $prev)}" >&2
  fi
  echo "$stage $job"
  prev=$job
done
