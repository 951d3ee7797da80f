#!/usr/bin/env bash
# Everything that needs the lent GPU, in one call of the device tool's `run`:
#
#   bash benchmarks/gpu_all.sh                 # every stage, in the order below
#   bash benchmarks/gpu_all.sh bench-bf16 e2e  # only these (e.g. the ones a cut-off call did not reach)
#
# Stages, most valuable first: build (CUDA kernels for $TORCH_CUDA_ARCH_LIST) -> gpu-tests (every test
# marked gpu, plus the Triton and scores suites, which run on CUDA tensors when a GPU is present) ->
# bench-fp16 (compress: eager / compile / reference / triton / cuda, copy bandwidth) -> sanitize
# (compute-sanitizer memcheck + racecheck over every GPU kernel) -> bench-bf16 -> scores (CLIP ViT-L
# tower, eager+attentions vs SDPA + cls_scores) -> e2e (LLaVA prefill: the issue's small LLM at batch 1,
# a 7B-proportioned LLM at batch 8) -> cpu-tests (the rest of the suite, which CI also runs).
#
# The device tool stops a command at 600 s, so the stages share one budget (GPU_ALL_BUDGET_S, default
# 570 s): each runs under `timeout` with what is left, and one that does not fit is reported as not
# reached. Every stage writes its own files into $OUT as it goes, so a cut-off call still returns what
# it did; at most 8 files come back: gpu_all.log, tests.log, sanitizer.log and one JSON per benchmark.
# Uses the machine's own CUDA-enabled python3 (no network there). Commit the JSONs under
# benchmarks/results/ naming the GPU; render tables and PNGs here with
# `benchmarks/results_table.py --plot`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
LOG="$OUT/gpu_all.log"
DEADLINE=$(( $(date +%s) + ${GPU_ALL_BUDGET_S:-570} ))
ALL=(build gpu-tests bench-fp16 sanitize bench-bf16 scores e2e cpu-tests)
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=("${ALL[@]}")
for s in "${STAGES[@]}"; do
  [[ " ${ALL[*]} " == *" $s "* ]] || { echo "unknown stage '$s' (stages: ${ALL[*]})"; exit 2; }
done
status=0
declare -A RESULT

say() { echo "$*" | tee -a "$LOG"; }
left() { echo $(( DEADLINE - $(date +%s) )); }

# run_stage NAME MIN_SECONDS CMD...: runs CMD under the time left, if at least MIN_SECONDS are left.
run_stage() {
  local name=$1 need=$2; shift 2
  local t; t=$(left)
  if [ "$t" -lt "$need" ]; then
    RESULT[$name]="not reached (${t}s left, needs ~${need}s)"; status=1; say "== $name: not reached"; return
  fi
  say "== $name ($(date +%T), ${t}s left)"
  local t0; t0=$(date +%s)
  # stages are functions: run them in a child bash (timeout signals its whole process group)
  timeout --kill-after=10 "$t" bash -o pipefail -c '"$@"' stage "$@"
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then RESULT[$name]="ok (${dt}s)"
  elif [ $rc -eq 124 ] || { [ $rc -eq 137 ] && [ "$dt" -ge "$t" ]; }; then RESULT[$name]="CUT OFF after ${dt}s"; status=1
  elif [ $rc -eq 137 ]; then RESULT[$name]="KILLED after ${dt}s (rc 137: out of memory?)"; status=1
  else RESULT[$name]="FAILED rc=$rc (${dt}s)"; status=1; fi
  say "   $name: ${RESULT[$name]}"
}

stage_build() {
  # setuptools < 77 rejects pyproject's SPDX license string; the device gets a copy of the tree, so
  # rewrite it there to the older table form rather than lose the whole call to it
  local restore=0
  if ! $PY -c "import sys, setuptools; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)"; then
    cp pyproject.toml "$OUT/.pyproject.orig" && restore=1
    sed -i 's/^license = "\(.*\)"$/license = {text = "\1"}/' pyproject.toml
  fi
  $PY setup.py -q build_ext --inplace >>"$LOG" 2>&1
  local rc=$?
  [ $restore -eq 1 ] && mv "$OUT/.pyproject.orig" pyproject.toml  # leave the checkout as it was
  [ $rc -eq 0 ] || { tail -n 40 "$LOG"; return 1; }
  $PY -c "import visionzip_kernels as vz; from visionzip_kernels import _extension
b = vz.available_backends('cuda'); print('backends on cuda:', b)
assert _extension.HAS_CUDA_KERNELS and 'cuda' in b and 'triton' in b, 'CUDA kernels or Triton missing'" 2>&1 | tee -a "$LOG"
}

stage_gpu_tests() {
  # -m gpu everywhere, plus the Triton and scores files whole: off a GPU they run in the interpreter,
  # here every one of their tests runs compiled on CUDA tensors. Triton compiles each kernel variant
  # on the CPU (seconds each): pytest-xdist spreads that over the cores when it is there.
  $PY -m pytest tests -q -p no:cacheprovider -rfEs -m gpu $XDIST 2>&1 | tee "$OUT/tests.log" | tail -n 6 | tee -a "$LOG"
  local a=${PIPESTATUS[0]}
  $PY -m pytest tests/test_triton.py tests/test_scores.py -q -p no:cacheprovider -rfE -m "not gpu" $XDIST 2>&1 \
    | tee -a "$OUT/tests.log" | tail -n 6 | tee -a "$LOG"
  local b=${PIPESTATUS[0]}
  [ "$a" -eq 0 ] && [ "$b" -eq 0 ]
}

stage_cpu_tests() {
  $PY -m pytest tests -q -p no:cacheprovider -rfE -m "not gpu" $XDIST \
    --ignore tests/test_triton.py --ignore tests/test_scores.py 2>&1 \
    | tee -a "$OUT/tests.log" | tail -n 6 | tee -a "$LOG"
}

stage_bench() {  # dtype
  $PY benchmarks/bench_compress.py --dtype "$1" --no-plot --out "$OUT/compress-gpu-$1.json" 2>&1 | tee -a "$LOG"
}

stage_e2e() {  # the issue's small LLM at batch 1, then a 7B-proportioned one at batch 8
  $PY benchmarks/bench_e2e.py --device cuda --out "$OUT/e2e-gpu.json" 2>&1 | tee -a "$LOG" &&
    $PY benchmarks/bench_e2e.py --device cuda --llm 7b --batch 8 --out "$OUT/e2e-gpu-7b-b8.json" 2>&1 | tee -a "$LOG"
}

stage_sanitize() {
  local rc=0 tool
  for tool in memcheck racecheck; do
    echo "== $tool" >>"$OUT/sanitizer.log"
    compute-sanitizer --tool "$tool" --error-exitcode 99 $PY benchmarks/sanitize_gpu.py >>"$OUT/sanitizer.log" 2>&1
    local r=$?
    tail -n 3 "$OUT/sanitizer.log" | tee -a "$LOG"
    [ $r -eq 0 ] || { say "   $tool: exit $r"; rc=1; }
  done
  return $rc
}

XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n ${GPU_ALL_WORKERS:-8}")
export PY LOG OUT DEADLINE XDIST
export -f say left stage_build stage_gpu_tests stage_cpu_tests stage_bench stage_sanitize stage_e2e

say "== device ($(date))"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$LOG"
$PY -c "import torch, triton, setuptools, numpy; print('torch', torch.__version__, 'triton', triton.__version__,
      'setuptools', setuptools.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"
$PY -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tee -a "$LOG"

for s in "${STAGES[@]}"; do
  case $s in
    build)      run_stage build 60 stage_build ;;
    gpu-tests)  run_stage gpu-tests 120 stage_gpu_tests ;;
    bench-fp16) run_stage bench-fp16 90 stage_bench float16 ;;
    bench-bf16) run_stage bench-bf16 90 stage_bench bfloat16 ;;
    sanitize)   run_stage sanitize 60 stage_sanitize ;;
    scores)     run_stage scores 45 $PY benchmarks/bench_scores.py --device cuda --out "$OUT/scores-gpu.json" ;;
    e2e)        run_stage e2e 90 stage_e2e ;;
    cpu-tests)  run_stage cpu-tests 60 stage_cpu_tests ;;
  esac
done

say "== summary (status $status)"
for s in "${STAGES[@]}"; do say "$(printf '%-11s %s' "$s" "${RESULT[$s]:-}")"; done
exit $status
