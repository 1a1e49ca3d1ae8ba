#!/usr/bin/env bash
# `make demo`: the whole Fox-1 pipeline on a real corpus on this CPU machine, at small scale.
#   1 corpus     Python docs prose + CPython stdlib code, offline   -> demo_out/corpus/stage{1,2,3}
#   2 data       SentencePiece tokenizer + `make preprocess`        -> demo_out/data/
#   3 train      3-stage curriculum, seq 256 -> 512 -> 1024, 2 ranks (PP2) -> demo_out/checkpoints/
#   4 export     megafox-to-hf                                      -> demo_out/hf/
#   5 report     transformers generation, loss curve, summary      -> demo_out/{loss_curve.png,summary.md}
# Finished steps are reused on a rerun; `make demo-clean` starts over.
# Environment: DEMO_OUT (default demo_out), DEMO_CORPUS_MB (6), DEMO_CONFIG, NPROC (2),
# MEGAFOX_OVERRIDES (passed to the trainer, e.g. smaller token budgets for a quick run),
# DEMO_MARGIN (nats below the unigram entropy the final loss must reach, default 0.5).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-.venv/bin/python}
OUT=${DEMO_OUT:-demo_out}
CONFIG=${DEMO_CONFIG:-configs/train/demo.yaml}
STARTED=$(date +%s)
mkdir -p "$OUT/logs"
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "1/5 corpus: Python documentation + CPython standard library (offline)"
if [[ -f "$OUT/corpus/.complete" ]]; then
    echo "reusing $OUT/corpus"
else
    "$PY" -m data_prep.offline_corpus --output "$OUT/corpus" --max-mb "${DEMO_CORPUS_MB:-6}"
    touch "$OUT/corpus/.complete"
fi

say "2/5 tokenizer + preprocess (make preprocess DATA_PLAN=configs/data/demo.yaml)"
DEMO_PLAN="$OUT/data_plan.yaml"
sed "s#demo_out/#$OUT/#g" configs/data/demo.yaml > "$DEMO_PLAN"
"$PY" -m data_prep.plan --plan "$DEMO_PLAN"

say "3/5 train: 3-stage curriculum on ${NPROC:-2} ranks"
export MEGAFOX_OVERRIDES="data_dir=$OUT/data checkpoint.dir=$OUT/checkpoints logging.tensorboard_dir=$OUT/tensorboard ${MEGAFOX_OVERRIDES:-}"
for stage in stage1 stage2 stage3; do
    echo "--- $stage"
    MEGAFOX_CONFIG="$CONFIG" MEGAFOX_NPROC=${NPROC:-2} MEGAFOX_MASTER_PORT=${MASTER_PORT:-29517} \
        bash launch/local.sh "$stage" 2>&1 | grep --line-buffered -v -i "warn" | tee -a "$OUT/logs/$stage.log"
done

say "4/5 export to Hugging Face format (megafox-to-hf)"
if [[ -f "$OUT/hf/config.json" && "$OUT/hf/config.json" -nt "$OUT/checkpoints/stage3.done" ]]; then
    echo "reusing $OUT/hf"
else
    "$PY" -m checkpoints_tools.to_hf --checkpoint "$OUT/checkpoints" --output "$OUT/hf" --dtype fp32 \
        --tokenizer "$OUT/data/tokenizer/tokenizer.model" --verify --tolerance 1e-4
fi

say "5/5 generate with transformers, plot, summarize"
"$PY" demo/report.py --out "$OUT" --config "$CONFIG" --started "$STARTED" --margin "${DEMO_MARGIN:-0.5}"
echo
echo "loss curve: $OUT/loss_curve.png   summary: $OUT/summary.md"
