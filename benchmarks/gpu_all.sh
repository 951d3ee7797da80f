#!/usr/bin/env bash
# Everything that needs the lent GPU, in one call (the device tool's `run`):
#   build with CUDA kernels -> whole test suite (GPU tests included) -> compress benchmarks (fp16, bf16)
#   -> scores benchmark (CLIP ViT-L tower, eager+attentions vs SDPA) -> end-to-end LLaVA prefill
#   -> compute-sanitizer memcheck + racecheck over every GPU backend.
# At most 8 files come back from the device tool: logs, one JSON per benchmark (no PNGs; render them
# here with benchmarks/bench_compress.py's plot()).
# Results land in $OUT (the device tool's folder) or benchmarks/results/gpu-run; commit them under
# benchmarks/results/ naming the GPU. Uses the machine's own CUDA-enabled python3 (no network there).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
LOG="$OUT/gpu_all.log"
status=0
step() { echo "== $*" | tee -a "$LOG"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$LOG"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"

step "build (CUDA kernels for $TORCH_CUDA_ARCH_LIST)"
$PY setup.py -q build_ext --inplace >>"$LOG" 2>&1 || { echo "BUILD FAILED" | tee -a "$LOG"; status=1; }
$PY -c "import visionzip_kernels as vz; print('backends on cuda:', vz.available_backends('cuda'))" 2>&1 | tee -a "$LOG"

step "tests"
$PY -m pytest tests -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/tests.log" | tail -n 25 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "benchmarks"
for dt in float16 bfloat16; do
  $PY benchmarks/bench_compress.py --dtype "$dt" --no-plot --out "$OUT/compress-gpu-$dt.json" 2>&1 | tee -a "$LOG" || status=1
done
$PY benchmarks/bench_scores.py --device cuda --out "$OUT/scores-gpu.json" 2>&1 | tee -a "$LOG" || status=1
$PY benchmarks/bench_e2e.py --device cuda --out "$OUT/e2e-gpu.json" 2>&1 | tee -a "$LOG" || status=1

step "compute-sanitizer"
for tool in memcheck racecheck; do
  echo "== $tool" >>"$OUT/sanitizer.log"
  compute-sanitizer --tool "$tool" --error-exitcode 99 $PY benchmarks/sanitize_gpu.py >>"$OUT/sanitizer.log" 2>&1
  rc=$?; tail -n 4 "$OUT/sanitizer.log" | tee -a "$LOG"; [ $rc -eq 0 ] || { echo "$tool: exit $rc" | tee -a "$LOG"; status=1; }
done
step "done (status $status)"
exit $status
