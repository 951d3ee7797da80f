// Run-time instruction-set selection for the CPU kernels.
//
// The extension is compiled for the baseline x86-64 ISA (a wheel must run everywhere), so
// at::vec::Vectorized is its generic array implementation here. Each kernel file therefore builds
// its kernel .inc three times through isa_builds.inc: once as is (namespace `portable`), once inside a
// `#pragma GCC target("avx2,fma")` region (namespace `avx2`) and once inside an AVX-512 region
// (namespace `avx512`: F, BW, VL, DQ), where GCC vectorises the same code for that ISA (and
// contracts a * b + c into FMA where a file asks for it, as the scores kernels do). Callers pick
// one at run time with cpu_isa().
// Results are deterministic for a given path (run to run and for any thread count); the paths may
// round differently.
//
// VISIONZIP_CPU_ISA=baseline|avx2|avx512 (read once, at the first kernel call) forces a path, e.g.
// to compare the paths or to measure one against another; asking for one the CPU lacks is an error.
// Unset or empty: the widest path the CPU supports.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define VISIONZIP_AVX2_BUILD 1  // the avx2 and avx512 namespaces exist (GCC target pragmas)
#endif

namespace visionzip {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest path this CPU runs (and this build has).
inline CpuIsa cpu_isa_supported() {
#ifdef VISIONZIP_AVX2_BUILD
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return CpuIsa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBaseline;
}

// The path the kernels take: the widest supported one, or VISIONZIP_CPU_ISA (read once).
inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    const CpuIsa best = cpu_isa_supported();
    const char* env = std::getenv("VISIONZIP_CPU_ISA");
    if (env == nullptr || *env == '\0') return best;
    const std::string v(env);
    CpuIsa want;
    if (v == "baseline") want = CpuIsa::kBaseline;
    else if (v == "avx2") want = CpuIsa::kAvx2;
    else if (v == "avx512") want = CpuIsa::kAvx512;
    else TORCH_CHECK(false, "VISIONZIP_CPU_ISA must be baseline, avx2 or avx512 (or unset); got '", v, "'");
    TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best), "VISIONZIP_CPU_ISA=", v,
                ": this CPU (or build) does not support it; the widest supported path is ",
                best == CpuIsa::kAvx2 ? "avx2" : "baseline");
    return want;
  }();
  return isa;
}

}  // namespace visionzip

// ISA_DISPATCH(call): run `avx512::call`, `avx2::call` or `portable::call` as cpu_isa() says.
#ifdef VISIONZIP_AVX2_BUILD
#define VISIONZIP_ISA_DISPATCH(call)                                                     \
  (::visionzip::cpu_isa() == ::visionzip::CpuIsa::kAvx512 ? avx512::call                \
   : ::visionzip::cpu_isa() == ::visionzip::CpuIsa::kAvx2 ? avx2::call                  \
                                                          : portable::call)
#else
#define VISIONZIP_ISA_DISPATCH(call) (portable::call)
#endif
