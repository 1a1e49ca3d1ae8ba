#!/usr/bin/env bash
# One GPU session's checks, ~8 minutes on one H100/H200: CUDA numerics, then the benchmarks.
# Expects the GPU machine described in /work/shared/recipes/megatron_core_on_cpu.md (Python 3.12,
# torch 2.11, transformers, triton; NO megatron-core) and, in ./.whl, a cp312 megatron-core
# 0.16.1 wheel (plus pytest/pluggy/iniconfig wheels if pytest is missing there). Results go to
# $OUT (or bench/results/): check.log, loss_only*.json, throughput.json, throughput_8k_variants.json,
# dataloader.json.
#
#   bash bench/gpu_check.sh            # everything (each step time-boxed)
#   BUDGET_S=420 bash bench/gpu_check.sh
#   PYTHON=.venv/bin/python BENCH_ARGS="--tiny --seqs 32,64,128 --loss-chunk-tokens 256" bash bench/gpu_check.sh
#                                      # CPU dry run of the script itself (tiny sizes)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
BUDGET_S="${BUDGET_S:-450}"
BENCH_ARGS="${BENCH_ARGS:-}"  # appended to every bench call (argparse: the last value wins)
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=8 PYTHONUNBUFFERED=1
exec > >(tee "$OUT/check.log") 2>&1

left() { echo $(( BUDGET_S - SECONDS )); }
step() { echo; echo "=== [$SECONDS s] $*"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
    step "install carried wheels (--no-deps)"
    ls .whl/*.whl && "$PY" -m pip install --no-deps --no-index -q .whl/*.whl
fi
"$PY" -c "import megatron.core as m; print('megatron-core', m.__version__)" || { echo "FAIL: megatron-core not importable"; exit 1; }

step "CUDA numerics: fused loss (fp32 1e-5, bf16 vs unfused), native vs local vs HF logits"
if "$PY" -c "import pytest" 2>/dev/null; then
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/model/test_device_numerics.py; echo "numerics exit $?"
else
    echo "SKIPPED: pytest is not installed (carry its wheels in ./.whl)"
fi

step "loss-only: LM head + CE at 8192 tokens, V=256000, H=2048, bf16 (fused vs unfused)"
timeout 120 "$PY" bench/throughput.py --loss-only --timeout 100 --json "$OUT/loss_only.json" $BENCH_ARGS; echo "loss-only exit $?"
# smaller chunks: less memory, more passes over the weight gradient; is 512 still as fast?
timeout 60 "$PY" bench/throughput.py --loss-only --variants precompute,recompute --loss-chunk-tokens 512 \
    --timeout 50 --json "$OUT/loss_only_chunk512.json" $BENCH_ARGS; echo "loss-only chunk512 exit $?"

step "throughput: Fox-1-1.6B, one micro-batch of 8K tokens (2K x4, 4K x2, 8K x1), megafox vs HF vs mcore"
timeout $(( $(left) > 60 ? $(left) - 45 : 60 )) "$PY" bench/throughput.py --systems megafox,hf,mcore \
    --seqs 2048,4096,8192 --mbs 4,2,1 --timeout 110 --json "$OUT/throughput.json" $BENCH_ARGS; echo "throughput exit $?"

if [ "$(left)" -gt 70 ]; then
    step "8K variants: megafox fused-loss recompute variant and unfused (what the fused loss buys)"
    timeout $(( $(left) - 5 )) "$PY" bench/throughput.py --systems megafox,megafox_unfused --loss-grad recompute \
        --seqs 8192 --mbs 1 --timeout 100 --json "$OUT/throughput_8k_variants.json" $BENCH_ARGS; echo "variants exit $?"
else
    echo "skipped 8K variants: $(left) s left of BUDGET_S=$BUDGET_S"
fi
if [ "$(left)" -gt 40 ]; then
    step "data loader vs what the GPU consumes (the DALI question; CPU only)"
    timeout 35 "$PY" bench/dataloader.py --tokens 8000000 --steps 4 --json "$OUT/dataloader.json"; echo "dataloader exit $?"
fi
step "done"
