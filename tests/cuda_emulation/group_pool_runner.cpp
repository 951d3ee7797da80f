// Runs the CUDA kernel of csrc/cuda/group_pool_kernel.cuh under the host emulation, with the launch
// plan of the torch binding (plan_group_pool). Driven by tests/test_cuda_emulation.py:  runner IN OUT
// IN: int64 header[10] (see below), float64 eps, then values and logits (raw little-endian bytes).
// OUT: output rows, labels (int64), counts (int64); the plan goes to stdout.
#include "host_emulation.h"
// clang-format off
#include "../../csrc/cuda/group_pool_kernel.cuh"
// clang-format on

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "buffer.h"

using namespace visionzip::cuda_kernel;

namespace {

enum Header { kValuesDtype, kLogitsDtype, kB, kM, kN, kC, kThreadsPerBlock, kSmemLimit, kNumSms, kSplits, kHeaderSize };

template <typename scalar_t, typename logit_t>
void run(GroupPoolParams p, const int64_t* hd) {
  const GroupPoolLaunch plan = plan_group_pool(p.batch, p.groups, p.patches, p.channels, size_t(hd[kSmemLimit]),
                                               int(hd[kNumSms]), int(hd[kSplits]));
  if (!plan.ok) throw std::runtime_error("shape exceeds the shared memory limit: needs " +
                                         std::to_string(plan.smem_bytes));
  p.split_channels = plan.split_channels;
  vz_emulation::launch(unsigned(p.batch), unsigned(hd[kThreadsPerBlock]), plan.smem_bytes,
                       [&] { group_pool_kernel<scalar_t, logit_t>(p); }, unsigned(plan.channel_splits));
  std::printf("plan smem=%zu splits=%d split_channels=%d\n", plan.smem_bytes, plan.channel_splits,
              plan.split_channels);
}

template <typename scalar_t>
void dispatch_logits(const GroupPoolParams& p, const int64_t* hd) {
  switch (hd[kLogitsDtype]) {
    case 0: return run<scalar_t, float>(p, hd);
    case 3: return run<scalar_t, double>(p, hd);
    default:
      if (hd[kLogitsDtype] != hd[kValuesDtype]) throw std::runtime_error("logits: values' dtype, float32 or float64");
      return run<scalar_t, scalar_t>(p, hd);
  }
}

}  // namespace

int main(int argc, char** argv) {
  return runner_main(argc, argv, [](FILE* in, const char* out_path) {
    int64_t hd[kHeaderSize];
    double eps = 0;
    read_exact(in, hd, sizeof(hd));
    read_exact(in, &eps, sizeof(eps));
    const int64_t b = hd[kB], m = hd[kM], n = hd[kN], c = hd[kC];
    const size_t vs = dtype_size(hd[kValuesDtype]), ls = dtype_size(hd[kLogitsDtype]);
    Buffer values(vs * b * n * c), logits(ls * b * m * n);
    read_exact(in, values.ptr, vs * b * n * c);
    read_exact(in, logits.ptr, ls * b * m * n);
    std::fclose(in);

    Buffer out(vs * b * m * c), labels(8 * b * n), counts(8 * b * m);
    GroupPoolParams p{};
    p.logits = logits.ptr;
    p.values = values.ptr;
    p.out = out.ptr;
    p.labels = labels.as<int64_t>();
    p.counts = counts.as<int64_t>();
    p.batch = int(b), p.groups = int(m), p.patches = int(n), p.channels = int(c);
    p.eps = float(eps);
    switch (hd[kValuesDtype]) {
      case 0: dispatch_logits<float>(p, hd); break;
      case 1: dispatch_logits<__half>(p, hd); break;
      case 2: dispatch_logits<__nv_bfloat16>(p, hd); break;
      default: throw std::runtime_error("bad values dtype code");
    }
    write_parts(out_path, {{out.ptr, vs * b * m * c}, {labels.ptr, 8 * b * n}, {counts.ptr, 8 * b * m}});
  });
}
