#!/usr/bin/env bash
# One GPU session's checks, ~8 minutes on one H100/H200: CUDA numerics, then the benchmarks.
# Expects the GPU machine described in /work/shared/recipes/megatron_core_on_cpu.md (Python 3.12,
# torch 2.11, transformers, triton; NO megatron-core) and, in ./.whl, a cp312 megatron-core
# 0.16.1 wheel (plus pytest/pluggy/iniconfig wheels if pytest is missing there). Results go to
# $OUT (or bench/results/): check.log, loss_only.json, throughput.json and, time permitting,
# loss_only_compiled.json, throughput_compiled.json, throughput_8k_variants.json, throughput_compiled_loss.json,
# loss_only_chunk512.json, dataloader.json.
#
#   bash bench/gpu_check.sh            # everything (each step time-boxed)
#   BUDGET_S=420 bash bench/gpu_check.sh
#   PYTHON=.venv/bin/python BENCH_ARGS="--tiny --seqs 32,64,128 --mbs 1 --loss-chunk-tokens 256" bash bench/gpu_check.sh
#                                      # CPU dry run of the script itself (tiny sizes)
# NUMERICS_TESTS (default tests/model/test_device_numerics.py): the pytest targets of the numerics step.
# STEPS (default all): a comma-separated subset of environment,numerics,benchmarks to run.
# Every step runs even after one fails (a session's results are worth having); the script then
# exits 1 and names the failed steps on its last line: a failed numerics test fails the check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
BUDGET_S="${BUDGET_S:-450}"
BENCH_ARGS="${BENCH_ARGS:-}"  # appended to every bench call (argparse: the last value wins)
NUMERICS_TESTS="${NUMERICS_TESTS:-tests/model/test_device_numerics.py}"
STEPS="${STEPS:-all}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=8 PYTHONUNBUFFERED=1
exec > >(tee "$OUT/check.log") 2>&1

left() { echo $(( BUDGET_S - SECONDS )); }
step() { echo; echo "=== [$SECONDS s] $*"; }
wanted() { [[ "$STEPS" == all || ",$STEPS," == *",$1,"* ]]; }
failed=()
status() {  # status NAME EXIT: report a step's exit status and remember a failure
    echo "$1 exit $2"
    [ "$2" -eq 0 ] || failed+=("$1 (exit $2)")
}

if wanted environment; then
step "environment"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
    step "install carried wheels (--no-deps)"
    ls .whl/*.whl && "$PY" -m pip install --no-deps --no-index -q .whl/*.whl
fi
"$PY" -c "import megatron.core as m; print('megatron-core', m.__version__)" || { echo "FAIL: megatron-core not importable"; exit 1; }
fi

if wanted numerics; then
step "CUDA numerics: fused loss (fp32 1e-5, bf16 vs unfused), native vs local vs HF logits"
if "$PY" -c "import pytest" 2>/dev/null; then
    # shellcheck disable=SC2086  # NUMERICS_TESTS may name several targets
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider $NUMERICS_TESTS; status numerics $?
else
    echo "NOT RUN: pytest is not installed (carry its wheels in ./.whl)"
    failed+=("numerics (pytest not installed)")
fi
fi

if wanted benchmarks; then
step "loss-only: LM head + CE at 8192 tokens, V=256000, H=2048, bf16 (fused vs unfused)"
timeout 120 "$PY" bench/throughput.py --loss-only --timeout 100 --json "$OUT/loss_only.json" $BENCH_ARGS; status loss-only $?

step "throughput: Fox-1-1.6B, one micro-batch of 8K tokens (2K x4, 4K x2, 8K x1), megafox vs HF vs mcore"
timeout $(( $(left) > 60 ? $(left) - 45 : 60 )) "$PY" bench/throughput.py --systems megafox,hf,mcore \
    --seqs 2048,4096,8192 --mbs 4,2,1 --timeout 110 --json "$OUT/throughput.json" $BENCH_ARGS; status throughput $?

# The rest in priority order, each only with the time it needs left (set BUDGET_S higher to get them).
optional() {  # optional NEEDED_S TITLE COMMAND...
    local need=$1 title=$2; shift 2
    if [ "$(left)" -lt "$need" ]; then echo "skipped ($(left) s left of BUDGET_S=$BUDGET_S): $title"; return; fi
    step "$title"
    timeout "$need" "$@"; status "$title" $?
}
optional 120 "loss-only with the torch.compile'd loss kernels (megafox.model.loss_kernels) vs eager precompute" \
    "$PY" bench/throughput.py --loss-only --variants precompute,precompute-compiled,recompute-compiled \
    --timeout 100 --json "$OUT/loss_only_compiled.json" $BENCH_ARGS
optional 240 "2K and 8K: megafox with compiled decoder layers and compiled loss kernels (first step compiles)" \
    "$PY" bench/throughput.py --systems megafox --compile-layers --loss-kernel compiled \
    --seqs 2048,8192 --mbs 4,1 --timeout 115 --json "$OUT/throughput_compiled.json" $BENCH_ARGS
optional 200 "8K variants: megafox fused-loss recompute variant and unfused (what the fused loss buys)" \
    "$PY" bench/throughput.py --systems megafox,megafox_unfused --loss-grad recompute \
    --seqs 8192 --mbs 1 --timeout 95 --json "$OUT/throughput_8k_variants.json" $BENCH_ARGS
optional 200 "2K and 8K: megafox with the compiled loss kernels (does compiling pay in the whole step?)" \
    "$PY" bench/throughput.py --systems megafox --loss-kernel compiled \
    --seqs 2048,8192 --mbs 4,1 --timeout 95 --json "$OUT/throughput_compiled_loss.json" $BENCH_ARGS
optional 60 "loss-only with 512-token chunks: less memory, more passes over the weight gradient; as fast?" \
    "$PY" bench/throughput.py --loss-only --variants precompute,recompute --loss-chunk-tokens 512 \
    --timeout 50 --json "$OUT/loss_only_chunk512.json" $BENCH_ARGS
optional 35 "data loader vs what the GPU consumes (the DALI question; CPU only)" \
    "$PY" bench/dataloader.py --tokens 8000000 --steps 4 --json "$OUT/dataloader.json"
fi
step "done"
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "$(IFS=';'; echo "${failed[*]}")"
    exit 1
fi
echo "all steps passed"
