// Run-time instruction-set selection for the CPU kernels.
//
// The extension is compiled for the baseline x86-64 ISA (a wheel must run everywhere), so
// at::vec::Vectorized is its generic array implementation here. Each kernel file therefore includes
// its kernel .inc twice: once as is (namespace `portable`), and once inside a
// `#pragma GCC target("avx2,fma")` region (namespace `avx2`), where GCC vectorises the same code
// for AVX2 (and contracts a * b + c into FMA where a file asks for it with `#pragma GCC optimize
// ("fp-contract=fast")`, as the scores kernels do). Callers pick one at run time with
// cpu_has_avx2_fma(). Results are deterministic for a given path; the paths may round differently.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define VISIONZIP_AVX2_BUILD 1
#endif

namespace visionzip {

inline bool cpu_has_avx2_fma() {
#ifdef VISIONZIP_AVX2_BUILD
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

}  // namespace visionzip

// ISA_DISPATCH(call): run `avx2::call` where the CPU has AVX2 + FMA, `portable::call` otherwise.
#ifdef VISIONZIP_AVX2_BUILD
#define VISIONZIP_ISA_DISPATCH(call) \
  (::visionzip::cpu_has_avx2_fma() ? avx2::call : portable::call)
#else
#define VISIONZIP_ISA_DISPATCH(call) (portable::call)
#endif
