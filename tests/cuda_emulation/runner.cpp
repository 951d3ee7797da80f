// Runs the CUDA kernels of csrc/cuda/compress_kernel.cuh under the host emulation, with the launch
// plan of the torch binding (plan_compress, pre-pass, scratch buffers). Driven by
// tests/test_cuda_emulation.py:  runner IN OUT
// IN: int64 header[21] (see below), then hidden, attn storage, metric (raw little-endian bytes).
// OUT: output rows, dominant indices (int64), contextual indices (int64), token_map (int64); the plan goes to stdout.
#include "host_emulation.h"
// clang-format off
#include "../../csrc/cuda/compress_kernel.cuh"
// clang-format on

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "buffer.h"

using namespace visionzip::cuda_kernel;

namespace {

enum Header {
  kHiddenDtype, kAttnDtype, kMetricDtype, kB, kN, kC, kH, kQ, kCm, kD, kCx, kHasCls,
  kStrideB, kStrideH, kStrideQ, kAttnNumel, kThreadsPerBlock, kSmemLimit, kNumSms, kAttnOffset, kSplits,
  kHeaderSize
};

template <typename scalar_t, typename attn_t, typename metric_t>
void run(CompressParams p, const int64_t* hd) {
  const LaunchPlan plan = plan_compress(p.batch, p.tokens, p.contextual, p.metric_dim, p.heads, p.queries,
                                        size_t(hd[kSmemLimit]), int(hd[kNumSms]), p.channels,
                                        p.metric == p.hidden, int(hd[kSplits]));
  if (!plan.ok) throw std::runtime_error("shape exceeds the shared memory limit: needs " +
                                         std::to_string(plan.smem_needed));
  p.partial_slices = plan.partial_slices;
  p.split_channels = plan.split_channels;
  Buffer partials(sizeof(float) * size_t(p.batch) * plan.partial_slices * p.tokens);
  Buffer scratch(sizeof(float) * size_t(p.batch) * plan.channel_splits * p.contextual * p.metric_dim);
  p.score_partials = plan.partial_slices > 1 ? partials.as<float>() : nullptr;
  p.target_scratch = (p.contextual > 0 && !plan.targets_in_smem) ? scratch.as<float>() : nullptr;
  if (plan.partial_slices > 1)
    vz_emulation::launch(unsigned(p.batch * plan.partial_slices), kPartialThreads, 0,
                         [&] { score_partials_kernel<attn_t>(p); });
  vz_emulation::launch(unsigned(p.batch), unsigned(hd[kThreadsPerBlock]), plan.smem_bytes,
                       [&] { compress_kernel<scalar_t, attn_t, metric_t>(p); }, unsigned(plan.channel_splits));
  std::printf("plan smem=%zu targets_in_smem=%d slices=%d splits=%d split_channels=%d\n", plan.smem_bytes,
              int(plan.targets_in_smem), plan.partial_slices, plan.channel_splits, plan.split_channels);
}

template <typename scalar_t>
void dispatch_aux(const CompressParams& p, const int64_t* hd) {
  const bool attn_f32 = hd[kAttnDtype] == 0, metric_f32 = hd[kMetricDtype] == 0;
  if (attn_f32 && metric_f32) return run<scalar_t, float, float>(p, hd);
  if (attn_f32) return run<scalar_t, float, scalar_t>(p, hd);
  if (metric_f32) return run<scalar_t, scalar_t, float>(p, hd);
  return run<scalar_t, scalar_t, scalar_t>(p, hd);
}

}  // namespace

int main(int argc, char** argv) {
  return runner_main(argc, argv, [](FILE* in, const char* out_path) {
    int64_t hd[kHeaderSize];
    read_exact(in, hd, sizeof(hd));
    const int64_t b = hd[kB], n = hd[kN], c = hd[kC], cm = hd[kCm], d = hd[kD], cx = hd[kCx];
    const size_t hs = dtype_size(hd[kHiddenDtype]);
    const bool own_metric = hd[kMetricDtype] >= 0;
    if (!own_metric) hd[kMetricDtype] = hd[kHiddenDtype];
    Buffer hidden(hs * b * n * c), attn(dtype_size(hd[kAttnDtype]) * hd[kAttnNumel]);
    Buffer metric(own_metric ? dtype_size(hd[kMetricDtype]) * b * n * cm : 0);
    read_exact(in, hidden.ptr, hs * b * n * c);
    read_exact(in, attn.ptr, dtype_size(hd[kAttnDtype]) * hd[kAttnNumel]);
    if (own_metric) read_exact(in, metric.ptr, dtype_size(hd[kMetricDtype]) * b * n * cm);
    std::fclose(in);

    Buffer out(hs * b * (d + cx) * c), dom(8 * b * d), tgt(8 * b * cx), map(8 * b * n);
    CompressParams p{};
    p.hidden = hidden.ptr;
    p.attn = attn.as<unsigned char>() + hd[kAttnOffset] * dtype_size(hd[kAttnDtype]);
    p.attn_stride_b = hd[kStrideB];
    p.attn_stride_h = hd[kStrideH];
    p.attn_stride_q = hd[kStrideQ];
    p.metric = own_metric ? metric.ptr : hidden.ptr;
    p.out = out.ptr;
    p.dominant = dom.as<int64_t>();
    p.contextual_indices = tgt.as<int64_t>();
    p.token_map = map.as<int64_t>();
    p.batch = int(b), p.tokens = int(n), p.channels = int(c), p.metric_dim = int(cm);
    p.heads = int(hd[kH]), p.queries = int(hd[kQ]);
    p.dominant_count = int(d), p.contextual = int(cx);
    p.step = cx > 0 ? int(std::max<int64_t>(1, (n - d) / cx)) : 1;
    p.has_cls = hd[kHasCls] != 0;
    switch (hd[kHiddenDtype]) {
      case 0: run<float, float, float>(p, hd); break;
      case 1: dispatch_aux<__half>(p, hd); break;
      case 2: dispatch_aux<__nv_bfloat16>(p, hd); break;
      default: throw std::runtime_error("bad dtype code");
    }
    write_parts(out_path, {{out.ptr, hs * b * (d + cx) * c}, {dom.ptr, 8 * b * d}, {tgt.ptr, 8 * b * cx},
                           {map.ptr, 8 * b * n}});
  });
}
