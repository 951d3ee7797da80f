"""Small runs of every GPU backend for compute-sanitizer (memcheck, racecheck): all attn forms,
has_cls both ways, keys given/absent, the three dtypes, shapes that are not powers of two."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import visionzip_kernels as vz  # noqa: E402

assert torch.cuda.is_available(), "needs a CUDA device"
backends = [b for b in vz.available_backends("cuda") if b != "reference"]
g = torch.Generator(device="cuda").manual_seed(0)
for backend in backends:
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for b, n, c, h, has_cls, k in [(2, 577, 1024, 16, True, 64), (3, 729, 1152, 4, False, 128),
                                       (1, 1025, 72, 2, True, 192), (2, 37, 33, 3, True, 10)]:
            for form in ("full", "rows", "scores"):
                shape = {"full": (b, h, n, n), "rows": (b, h, n), "scores": (b, n)}[form]
                attn = torch.rand(shape, generator=g, device="cuda", dtype=dtype)
                hidden = torch.randn(b, n, c, generator=g, device="cuda", dtype=dtype)
                for keys in (torch.randn(b, n, 64, generator=g, device="cuda", dtype=dtype), None):
                    vz.compress(hidden, attn, k, keys=keys, has_cls=has_cls, backend=backend, return_indices=True)
    torch.cuda.synchronize()
    print(f"{backend}: ok")
