"""Host emulation of the CUDA kernels (csrc/cuda/compress_kernel.cuh): build and drive the runner.

The runner (runner.cpp) compiles the kernel header as host C++ with host_emulation.h standing in for
the CUDA built-ins (one std::thread per CUDA thread, std::barrier for __syncthreads and for warp
shuffles/ballots), and runs the same launch plan as the torch binding. It checks the block
algorithm (selection, tie rules, compaction, assignment, segmented mean, indexing, shared-memory
layout) on the CPU; it says nothing about GPU-only behaviour (memory model, timing, occupancy).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

from visionzip_kernels import CompressResult, check_compress_inputs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def build_runner(out_dir: Path) -> Path:
    """Compile runner.cpp with g++ (C++20, -pthread); returns the executable's path."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None or not (CUDA_INCLUDE / "cuda_fp16.h").exists():
        raise FileNotFoundError("needs g++ and the CUDA headers (cuda_fp16.h) for the host emulation")
    exe = out_dir / "vz_cuda_emulation_runner"
    cmd = [
        cxx, "-std=c++20", "-O2", "-pthread", "-Wall", "-Wno-unknown-pragmas", f"-I{CUDA_INCLUDE}",
        str(HERE / "runner.cpp"), "-o", str(exe),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _scores_view(attn: torch.Tensor, has_cls: bool) -> torch.Tensor:
    """The (B, H, Q, N) view of csrc/compress_common.h check_compress_inputs."""
    if attn.dim() == 4:
        return attn[:, :, :1, :] if has_cls else attn
    if attn.dim() == 3:
        return attn.unsqueeze(2)
    return attn.unsqueeze(1).unsqueeze(2)


def run_emulated(
    runner: Path,
    hidden: torch.Tensor,
    attn: torch.Tensor,
    k: int,
    *,
    keys: Optional[torch.Tensor] = None,
    contextual: Optional[int] = None,
    has_cls: bool = True,
    threads: int = 64,
    smem_limit: int = 227 * 1024,
    num_sms: int = 132,
    attn_offset: int = 0,
    splits: int = 0,
    timeout: float = 300.0,
) -> tuple[CompressResult, str]:
    """Run the emulated CUDA pass (splits: blocks per image, 0 for the binding's choice); returns the
    result and the runner's plan line."""
    plan = check_compress_inputs(hidden, attn, k, keys, contextual, has_cls)
    aux = lambda t: t if t.dtype in (hidden.dtype, torch.float32) else t.float()  # noqa: E731
    base = aux(attn).contiguous()
    view = _scores_view(base, has_cls)
    metric = None if keys is None else aux(keys).contiguous()
    b, n, c = hidden.shape
    h, q = view.shape[1], view.shape[2]
    cm = c if metric is None else metric.shape[2]
    storage = torch.cat([base.new_zeros(attn_offset), base.flatten()])
    header = [
        DTYPE_CODE[hidden.dtype], DTYPE_CODE[base.dtype], -1 if metric is None else DTYPE_CODE[metric.dtype],
        b, n, c, h, q, cm, plan.dominant, plan.contextual, int(has_cls),
        view.stride(0), view.stride(1), view.stride(2), storage.numel(), threads, smem_limit, num_sms, attn_offset,
        splits,
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        with open(src, "wb") as f:
            f.write(struct.pack(f"<{len(header)}q", *header))
            f.write(_raw(hidden))
            f.write(_raw(storage))
            if metric is not None:
                f.write(_raw(metric))
        proc = subprocess.run([str(runner), str(src), str(dst)], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"emulated kernel failed: {proc.stderr.strip()}")
        raw = dst.read_bytes()
    d, cx = plan.dominant, plan.contextual
    sizes = [b * (d + cx) * c * hidden.element_size(), 8 * b * d, 8 * b * cx, 8 * b * n]
    parts, at = [], 0
    for s in sizes:
        parts.append(bytearray(raw[at : at + s]))
        at += s
    assert at == len(raw), "runner output has an unexpected size"
    store = torch.int16 if hidden.dtype in (torch.float16, torch.bfloat16) else torch.float32
    out = torch.frombuffer(parts[0], dtype=store).view(hidden.dtype).reshape(b, d + cx, c) if sizes[0] else (
        hidden.new_empty(b, d + cx, c))
    idx = [
        torch.frombuffer(p, dtype=torch.int64).reshape(shape) if len(p) else torch.empty(shape, dtype=torch.int64)
        for p, shape in zip(parts[1:], ((b, d), (b, cx), (b, n)))
    ]
    return CompressResult(out.clone(), *(t.clone() for t in idx)), proc.stdout.strip()
