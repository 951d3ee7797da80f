"""Small runs of every GPU kernel for compute-sanitizer (memcheck, racecheck): each compress backend on
all attn forms, has_cls both ways, keys given/absent, the three dtypes, shapes that are not powers of
two, one CUDA-graph replay; the Triton score kernels (cls_scores, received_scores incl. cu_seqlens)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import visionzip_kernels as vz  # noqa: E402
from visionzip_kernels import scores  # noqa: E402

assert torch.cuda.is_available(), "needs a CUDA device"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
g = torch.Generator(device="cuda").manual_seed(0)


def rand(*shape, dtype):
    return torch.randn(shape, generator=g, device="cuda", dtype=dtype)


backends = [b for b in vz.available_backends("cuda") if b != "reference"]
for backend in backends:
    for dtype in DTYPES:
        for b, n, c, h, has_cls, k in [(2, 577, 1024, 16, True, 64), (3, 729, 1152, 4, False, 128),
                                       (1, 1025, 72, 2, True, 192), (2, 37, 33, 3, True, 10)]:
            for form in ("full", "rows", "scores"):
                shape = {"full": (b, h, n, n), "rows": (b, h, n), "scores": (b, n)}[form]
                attn = torch.rand(shape, generator=g, device="cuda", dtype=dtype)
                hidden = rand(b, n, c, dtype=dtype)
                for keys in (rand(b, n, 64, dtype=dtype), None):
                    vz.compress(hidden, attn, k, keys=keys, has_cls=has_cls, backend=backend, return_indices=True)
    # one capture + replay: the graph path launches the same kernels from a captured stream
    hidden, attn = rand(2, 577, 256, dtype=torch.float16), torch.rand(2, 8, 577, device="cuda").half()
    vz.compress(hidden, attn, 64, backend=backend)
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        out = vz.compress(hidden, attn, 64, backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    print(f"compress {backend}: ok")

for backend in [b for b in scores.available_score_backends("cuda") if b != "reference"]:
    for dtype in DTYPES:
        for b, h, n, d in [(2, 16, 577, 64), (1, 3, 1025, 72), (3, 2, 37, 16)]:
            q, k = rand(b, h, n, d, dtype=dtype), rand(b, h, n, d, dtype=dtype)
            scores.cls_scores(q[:, :, 0], k, backend=backend)
            scores.received_scores(q, k, backend=backend)
        q, k = rand(1, 4, 700, 80, dtype=dtype), rand(1, 4, 700, 80, dtype=dtype)
        cu = torch.tensor([0, 256, 256, 600, 700], device="cuda", dtype=torch.int32)
        scores.received_scores(q, k, cu_seqlens=cu, backend=backend)
    torch.cuda.synchronize()
    print(f"scores {backend}: ok")
