// The CPU's last-level cache size, which the CPU kernels compare their working set with to choose
// an order of memory accesses (never the arithmetic: results do not depend on it).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>

#include <unistd.h>

namespace visionzip {

// Bytes of the largest cache of CPU 0 (Linux sysfs: the cache, not the sum over the host's
// caches that sysconf may report inside a VM), else sysconf's L3, else 32 MiB.
// VISIONZIP_CPU_CACHE_BYTES (a byte count, read once at the first kernel call) overrides it, e.g.
// to compare the kernels' access orders.
inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    if (const char* env = std::getenv("VISIONZIP_CPU_CACHE_BYTES"); env != nullptr && *env != '\0') {
      char* end = nullptr;
      const long long v = std::strtoll(env, &end, 10);
      TORCH_CHECK(*end == '\0' && v >= 0, "VISIONZIP_CPU_CACHE_BYTES must be a byte count >= 0 (or unset); got '",
                  env, "'");
      return static_cast<int64_t>(v);
    }
    int64_t best = 0;
    for (int i = 0; i < 8; ++i) {  // sysfs sizes read "32768K"
      std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/size");
      int64_t v = 0;
      std::string unit;
      if (!(f >> v)) continue;
      f >> unit;
      v *= unit == "K" ? 1024 : unit == "M" ? 1024 * 1024 : 1;
      best = std::max(best, v);
    }
#ifdef _SC_LEVEL3_CACHE_SIZE
    if (best == 0) best = std::max<int64_t>(0, sysconf(_SC_LEVEL3_CACHE_SIZE));
#endif
    return best > 0 ? best : int64_t(32) << 20;
  }();
  return bytes;
}

// Whether a segmented sum over rows of `bytes` in all reads its rows sum by sum (each sum's rows
// in their own order; segmented_sum.inc, stream_rows): when they fit in the last-level cache, where
// that keeps a sum in L1 and measured faster; rows streamed from DRAM measured faster in their own
// order. Either order gives the same bits.
inline bool read_sum_by_sum(int64_t bytes) { return bytes <= last_level_cache_bytes(); }

}  // namespace visionzip
