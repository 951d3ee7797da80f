"""Compile every Triton kernel of the package for real GPUs, without a GPU (CI).

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python semantics on the CPU but never lowers
them, so an op, layout or type the GPU compiler rejects, or a block that spills, shows up there only
on a GPU. This tool stands in a driver that reports a CUDA target (sm_80, sm_90) and makes every
launch a compile-only ``warmup``, runs the real launchers on CPU tensors of representative shapes
(every kernel, every dtype, one-chunk and chunked selection, segments or not, channel splits), then reads registers
and spills from ptxas' report on each kernel's PTX.

    python tools/check_triton_build.py             # table; exit 1 on any compile error
    python tools/check_triton_build.py --arch 90   # one target

Relies on Triton internals (``triton.runtime.driver.set_active``, ``JITFunction.run``): written
for triton 3.6-3.7.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("check_triton_build: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import JITFunction  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class CompileOnlyDriver:
    """What JITFunction.run asks of the active driver, for a GPU that is not there."""

    def __init__(self, capability: int) -> None:
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


def launches() -> None:
    """Every kernel through its launcher, on CPU tensors (shapes as in the workloads)."""
    from visionzip_kernels.triton import _utils
    from visionzip_kernels.triton import compress as tc
    from visionzip_kernels.triton import group_pool as tg
    from visionzip_kernels.triton import scores as ts

    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float16):
        return torch.randn(shape, generator=g).to(dtype)

    _utils.check_device = lambda name, t: None  # CPU tensors stand in for CUDA ones
    # compress: CLS rows / scores / full matrix without CLS (received-attention pre-pass), each dtype,
    # N in one chunk (577, 729) and chunked (4097), keys given or the hidden states as metric, and the
    # channel slices a GPU picks (4 x 256 for CLIP-L with keys, 2 with the hidden states as metric)
    splits = _utils.CHANNEL_SPLITS
    try:
        for s in (1, 4):
            _utils.CHANNEL_SPLITS = s
            tc.compress_triton(r(2, 577, 1024), r(2, 16, 577), 64, keys=r(2, 577, 64))
        _utils.CHANNEL_SPLITS = 4
        tc.compress_triton(r(1, 729, 1152, dtype=torch.bfloat16), r(1, 16, 729, 729, dtype=torch.bfloat16), 64,
                           keys=r(1, 729, 72, dtype=torch.bfloat16), has_cls=False)
        _utils.CHANNEL_SPLITS = 2
        tc.compress_triton(r(1, 4097, 1024, dtype=torch.float32), r(1, 4097, dtype=torch.float32), 192)
        tc.compress_triton(r(1, 4097, 1024), r(1, 16, 4097), 64)
        # group_pool: M = 64 groups of N = 576 patches (VisToG on LLaVA-1.5), each values dtype, float64
        # logits, and the channel slices a GPU picks for C = 1024 (4 x 256)
        for s in (1, 4):
            _utils.CHANNEL_SPLITS = s
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                tg.group_pool_triton(r(8, 64, 576, dtype=dtype), r(8, 576, 1024, dtype=dtype))
        tg.group_pool_triton(r(2, 64, 729, dtype=torch.float64), r(2, 729, 1152, dtype=torch.bfloat16))
    finally:
        _utils.CHANNEL_SPLITS = splits
    # scores: the CLS row; received attention with and without packed segments
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        q, k = r(2, 16, 577, 64, dtype=dtype), r(2, 16, 577, 64, dtype=dtype)
        ts.cls_scores_triton(q[:, :, 0], k)
        ts.received_scores_triton(q, k)
        ts.received_scores_triton(q[:1], k[:1], torch.tensor([0, 256, 577], dtype=torch.int32))


def compile_all(capability: int) -> list[tuple[str, str, object]]:
    compiled: list[tuple[str, str, object]] = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        consts = ",".join(f"{k}={v}" for k, v in kwargs.items() if k.isupper())
        compiled.append((self.fn.__name__, consts, kernel))
        return kernel

    from visionzip_kernels.triton import compress as tc
    from visionzip_kernels.triton import group_pool as tg
    from visionzip_kernels.triton import scores as ts

    for fn in [v for m in (tc, tg, ts) for v in vars(m).values() if isinstance(v, JITFunction)]:
        fn.device_caches.clear()  # binders and compiled kernels are cached per device, not per target
    _driver.set_active(CompileOnlyDriver(capability))
    JITFunction.run = run
    try:
        launches()
    finally:
        JITFunction.run = original  # (no reset_active: without a GPU there is no default driver)
    return compiled


def ptxas_report(ptx: str, arch: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ptxas -v on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(int(re.sub(r"\D", "", arch))).path
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(d) / "k.o")],
                             capture_output=True, text=True, check=True)
    regs = int(re.search(r"Used (\d+) registers", res.stderr).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    return regs, int(spills.group(1)), int(spills.group(2))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="*", default=[80, 90], help="compute capabilities (default 80 90)")
    args = p.parse_args()
    print(f"triton {triton.__version__}, torch {torch.__version__}")
    seen = 0
    for cap in args.arch:
        arch = f"sm_{cap}a" if cap == 90 else f"sm_{cap}"
        rows = {}
        for name, consts, kernel in compile_all(cap):
            rows[(name, consts)] = kernel
        print(f"\n{arch}: {len(rows)} kernel variants compiled")
        print(f"  {'kernel':<28} {'regs':>5} {'spill st':>9} {'spill ld':>9} {'smem B':>7}  constexprs")
        for (name, consts), kernel in sorted(rows.items()):
            regs, st, ld = ptxas_report(kernel.asm["ptx"], arch)
            print(f"  {name:<28} {regs:>5} {st:>9} {ld:>9} {kernel.metadata.shared:>7}  {consts}")
        seen += len(rows)
    return 0 if seen else 1


if __name__ == "__main__":
    sys.exit(main())
