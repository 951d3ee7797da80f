"""Measured floating-point FMA peak of this CPU: a register-resident chain of fused multiply-adds
(24 independent accumulators per thread, so FMA latency is hidden), compiled here with the system C
compiler for AVX-512 and AVX2 and run on N threads (OpenMP). The reference against which
bench_scores.py --kernels states the score kernels' FLOP rate.

    python benchmarks/cpu_peak.py            # GFLOP/s float32 per ISA the CPU has, torch's thread count

No dependency on the package; needs a C compiler (cc / gcc) with OpenMP, like the extension build.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_SRC = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define CHAIN(V, FMA, SET1, ADD, RED)                                                      \
  V a[24];                                                                                  \
  for (int i = 0; i < 24; ++i) a[i] = SET1(1.0f + i * 1e-3f);                               \
  const V m = SET1(0.999999f), c = SET1(1e-7f);                                             \
  for (int64_t it = 0; it < iters; ++it) {                                                  \
    _Pragma("GCC unroll 24") for (int i = 0; i < 24; ++i) a[i] = FMA(a[i], m, c);           \
  }                                                                                         \
  V s = a[0];                                                                               \
  for (int i = 1; i < 24; ++i) s = ADD(s, a[i]);                                            \
  sink[omp_get_thread_num()] = RED(s);

__attribute__((target("avx512f"))) static float red512(__m512 s) { return _mm512_reduce_add_ps(s); }
__attribute__((target("avx2,fma"))) static float red256(__m256 s) {
  float t[8]; _mm256_storeu_ps(t, s); float r = 0; for (int i = 0; i < 8; ++i) r += t[i]; return r;
}

/* iters x 24 FMAs of 16 (8) float lanes per thread: 2 * 16 * 24 * iters FLOP per thread */
__attribute__((target("avx512f"))) void fma512(int64_t iters, int threads, float* sink) {
#pragma omp parallel num_threads(threads)
  { CHAIN(__m512, _mm512_fmadd_ps, _mm512_set1_ps, _mm512_add_ps, red512) }
}
__attribute__((target("avx2,fma"))) void fma256(int64_t iters, int threads, float* sink) {
#pragma omp parallel num_threads(threads)
  { CHAIN(__m256, _mm256_fmadd_ps, _mm256_set1_ps, _mm256_add_ps, red256) }
}
"""

_LANES = {"avx512": 16, "avx2": 8}
_FLAGS = {"avx512": {"avx512f"}, "avx2": {"avx2", "fma"}}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def cpu_isa_paths() -> list[str]:
    """The CPU kernels' instruction-set paths this CPU runs, narrowest first, by the flags
    csrc/cpu/isa.h checks (the wider paths exist only in x86-64 GCC builds); the last one is the
    default, VISIONZIP_CPU_ISA may force another."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["baseline"]
    flags = cpu_flags()
    out = ["baseline"]
    if {"avx2", "fma"} <= flags:
        out.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            out.append("avx512")
    return out


def _library(workdir: Path) -> ctypes.CDLL | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src, lib = workdir / "fma_peak.c", workdir / "fma_peak.so"
    src.write_text(_SRC)
    res = subprocess.run([cc, "-O3", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(lib)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        print(f"cpu_peak: could not compile the FMA loop:\n{res.stderr[-2000:]}", file=sys.stderr)
        return None
    return ctypes.CDLL(str(lib))


def fma_peak_gflops(threads: int, min_time: float = 0.3) -> dict[str, float]:
    """float32 GFLOP/s (an FMA counts 2) per ISA the CPU supports, best of a few runs of ~min_time s."""
    flags = cpu_flags()
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        lib = _library(Path(tmp))
        if lib is None:
            return out
        sink = (ctypes.c_float * 256)()
        for isa, fn_name in (("avx512", "fma512"), ("avx2", "fma256")):
            if not _FLAGS[isa] <= flags:
                continue
            fn = getattr(lib, fn_name)
            fn.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
            iters = 1 << 16
            best = 0.0
            while True:  # grow until one run takes ~min_time / 4
                t0 = time.perf_counter()
                fn(iters, threads, sink)
                dt = time.perf_counter() - t0
                if dt > min_time / 4:
                    break
                iters *= 2
            for _ in range(5):
                t0 = time.perf_counter()
                fn(iters, threads, sink)
                dt = time.perf_counter() - t0
                best = max(best, 2 * _LANES[isa] * 24 * iters * threads / dt / 1e9)
            out[isa] = best
    return out


def main() -> None:
    import torch

    threads = torch.get_num_threads()
    peaks = fma_peak_gflops(threads)
    print(json.dumps({"threads": threads, "cpu_count": os.cpu_count(), "fma_peak_gflops_float32": peaks}, indent=2))


if __name__ == "__main__":
    main()
