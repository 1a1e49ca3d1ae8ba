#!/usr/bin/env bash
# `make demo`: the whole Fox-1 pipeline on a real corpus on this CPU machine, at small scale.
#   1 corpus     Python docs prose + CPython stdlib code, offline   -> demo_out/corpus/stage{1,2,3}
#   2 data       SentencePiece tokenizer + `make preprocess`        -> demo_out/data/
#   3 train      3-stage curriculum, seq 256 -> 512 -> 1024, 2 ranks (PP2) -> demo_out/checkpoints/
#   4 sft        chat data (stdlib docstrings) + instruction tuning -> demo_out/checkpoints_sft/
#   5 export     megafox-to-hf: base and instruct models            -> demo_out/hf/, demo_out/hf_instruct/
#   6 report     generation, a chat exchange, loss curves, summary  -> demo_out/{loss_curve,sft_loss}.png, summary.md
# Finished steps are reused on a rerun; `make demo-clean` starts over.
# Environment: DEMO_OUT (default demo_out), DEMO_CORPUS_MB (6), DEMO_CONFIG, NPROC (2),
# MEGAFOX_OVERRIDES (passed to the pretraining stages, e.g. smaller token budgets for a quick run),
# DEMO_SFT_OVERRIDES (passed to the sft stage), DEMO_MARGIN (nats below the unigram entropy the
# final loss must reach, default 0.5).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-.venv/bin/python}
OUT=${DEMO_OUT:-demo_out}
CONFIG=${DEMO_CONFIG:-configs/train/demo.yaml}
STARTED=$(date +%s)
mkdir -p "$OUT/logs"
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "1/6 corpus: Python documentation + CPython standard library (offline)"
if [[ -f "$OUT/corpus/.complete" ]]; then
    echo "reusing $OUT/corpus"
else
    "$PY" -m data_prep.offline_corpus --output "$OUT/corpus" --max-mb "${DEMO_CORPUS_MB:-6}"
    touch "$OUT/corpus/.complete"
fi

say "2/6 tokenizer + preprocess (make preprocess DATA_PLAN=configs/data/demo.yaml)"
DEMO_PLAN="$OUT/data_plan.yaml"
sed "s#demo_out/#$OUT/#g" configs/data/demo.yaml > "$DEMO_PLAN"
"$PY" -m data_prep.plan --plan "$DEMO_PLAN"

say "3/6 train: 3-stage curriculum on ${NPROC:-2} ranks"
export MEGAFOX_OVERRIDES="data_dir=$OUT/data checkpoint.dir=$OUT/checkpoints logging.tensorboard_dir=$OUT/tensorboard ${MEGAFOX_OVERRIDES:-}"
for stage in stage1 stage2 stage3; do
    echo "--- $stage"
    MEGAFOX_CONFIG="$CONFIG" MEGAFOX_NPROC=${NPROC:-2} MEGAFOX_MASTER_PORT=${MASTER_PORT:-29517} \
        bash launch/local.sh "$stage" 2>&1 | grep --line-buffered -v -i "warn" | tee -a "$OUT/logs/$stage.log"
done

say "4/6 instruction tuning: chat data (make preprocess DATA_PLAN=configs/data/demo_sft.yaml) + the sft stage"
if [[ ! -f "$OUT/chat/.complete" ]]; then
    "$PY" -m data_prep.sft_offline_chat --output "$OUT/chat"
    touch "$OUT/chat/.complete"
fi
SFT_PLAN="$OUT/data_plan_sft.yaml"
sed "s#demo_out/#$OUT/#g" configs/data/demo_sft.yaml > "$SFT_PLAN"
"$PY" -m data_prep.plan --plan "$SFT_PLAN"
MEGAFOX_OVERRIDES="data_dir=$OUT/data_sft checkpoint.dir=$OUT/checkpoints_sft checkpoint.init_from=$OUT/checkpoints logging.tensorboard_dir=$OUT/tensorboard_sft ${DEMO_SFT_OVERRIDES:-}" \
    MEGAFOX_CONFIG=configs/train/demo_sft.yaml MEGAFOX_NPROC=${NPROC:-2} MEGAFOX_MASTER_PORT=${MASTER_PORT:-29517} \
    bash launch/local.sh sft 2>&1 | grep --line-buffered -v -i "warn" | tee -a "$OUT/logs/sft.log"

say "5/6 export to Hugging Face format (megafox-to-hf): the base and the instruct model"
if [[ -f "$OUT/hf/config.json" && "$OUT/hf/config.json" -nt "$OUT/checkpoints/stage3.done" ]]; then
    echo "reusing $OUT/hf"
else
    "$PY" -m checkpoints_tools.to_hf --checkpoint "$OUT/checkpoints" --output "$OUT/hf" --dtype fp32 \
        --tokenizer "$OUT/data/tokenizer/tokenizer.model" --verify --tolerance 1e-4
fi
if [[ -f "$OUT/hf_instruct/config.json" && "$OUT/hf_instruct/config.json" -nt "$OUT/checkpoints_sft/sft.done" ]]; then
    echo "reusing $OUT/hf_instruct"
else  # the tokenizer and its chat template come from the checkpoint's record
    "$PY" -m checkpoints_tools.to_hf --checkpoint "$OUT/checkpoints_sft" --output "$OUT/hf_instruct" --dtype fp32 \
        --verify --tolerance 1e-4
fi

say "6/6 generate and chat with transformers, plot, summarize"
"$PY" demo/report.py --out "$OUT" --config "$CONFIG" --started "$STARTED" --margin "${DEMO_MARGIN:-0.5}"
echo
echo "loss curves: $OUT/loss_curve.png $OUT/sft_loss.png   summary: $OUT/summary.md"
