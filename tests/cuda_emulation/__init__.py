"""Host emulation of the CUDA kernels (csrc/cuda/*_kernel.cuh): build and drive the runners.

A runner (runner.cpp for compress, group_pool_runner.cpp for group_pool) compiles the kernel header
as host C++ with host_emulation.h standing in for the CUDA built-ins (one std::thread per CUDA
thread, std::barrier for __syncthreads and for warp shuffles/ballots), and runs the same launch plan
as the torch binding. It checks the block algorithm (selection, tie rules, compaction, assignment,
segmented sums, indexing, shared-memory layout) on the CPU; it says nothing about GPU-only behaviour
(memory model, timing, occupancy).
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

from visionzip_kernels import CompressResult, GroupPoolResult, check_compress_inputs
from visionzip_kernels.ops.group_pool import check_group_pool_inputs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def build_runner(out_dir: Path, source: str = "runner.cpp") -> Path:
    """Compile a runner (runner.cpp: compress; group_pool_runner.cpp) with g++ (C++20, -pthread);
    returns the executable's path."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None or not (CUDA_INCLUDE / "cuda_fp16.h").exists():
        raise FileNotFoundError("needs g++ and the CUDA headers (cuda_fp16.h) for the host emulation")
    exe = out_dir / f"vz_cuda_emulation_{Path(source).stem}"
    cmd = [
        cxx, "-std=c++20", "-O2", "-pthread", "-Wall", "-Wno-unknown-pragmas", f"-I{CUDA_INCLUDE}",
        str(HERE / source), "-o", str(exe),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _run(runner: Path, inputs: list[bytes], sizes: list[int], timeout: float) -> tuple[list[bytearray], str]:
    """Write ``inputs`` to a file, run ``runner IN OUT``, split OUT into parts of ``sizes`` bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        src.write_bytes(b"".join(inputs))
        proc = subprocess.run([str(runner), str(src), str(dst)], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"emulated kernel failed: {proc.stderr.strip()}")
        raw = dst.read_bytes()
    parts, at = [], 0
    for s in sizes:
        parts.append(bytearray(raw[at : at + s]))
        at += s
    assert at == len(raw), "runner output has an unexpected size"
    return parts, proc.stdout.strip()


def _tensor(part: bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` from a runner's raw output bytes (a copy)."""
    if not len(part):
        return torch.empty(shape, dtype=dtype)
    store = torch.int16 if dtype in (torch.float16, torch.bfloat16) else dtype
    return torch.frombuffer(part, dtype=store).view(dtype).reshape(shape).clone()


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
    inputs = [struct.pack(f"<{len(header)}q", *header), _raw(hidden), _raw(storage)]
    if metric is not None:
        inputs.append(_raw(metric))
    d, cx = plan.dominant, plan.contextual
    sizes = [b * (d + cx) * c * hidden.element_size(), 8 * b * d, 8 * b * cx, 8 * b * n]
    parts, stdout = _run(runner, inputs, sizes, timeout)
    out = _tensor(parts[0], hidden.dtype, (b, d + cx, c))
    idx = [_tensor(p, torch.int64, shape) for p, shape in zip(parts[1:], ((b, d), (b, cx), (b, n)))]
    return CompressResult(out, *idx), stdout


def run_group_pool_emulated(
    runner: Path,
    logits: torch.Tensor,
    values: torch.Tensor,
    eps: float = 1.0,
    *,
    threads: int = 64,
    smem_limit: int = 227 * 1024,
    num_sms: int = 132,
    splits: int = 0,
    timeout: float = 300.0,
) -> tuple[GroupPoolResult, str]:
    """Run the emulated CUDA group_pool (splits: blocks per image, 0 for the binding's choice) with the
    binding's dtype rule (logits in values' dtype, float32 or float64, others widened to float32);
    returns the result and the runner's plan line."""
    plan = check_group_pool_inputs(logits, values, eps)
    if logits.dtype not in (values.dtype, torch.float32, torch.float64):
        logits = logits.float()
    b, m, n, c = plan.batch, plan.groups, plan.patches, plan.channels
    header = [DTYPE_CODE[values.dtype], DTYPE_CODE[logits.dtype], b, m, n, c, threads, smem_limit, num_sms, splits]
    inputs = [struct.pack(f"<{len(header)}qd", *header, plan.eps), _raw(values), _raw(logits)]
    sizes = [b * m * c * values.element_size(), 8 * b * n, 8 * b * m]
    parts, stdout = _run(runner, inputs, sizes, timeout)
    out = _tensor(parts[0], values.dtype, (b, m, c))
    return GroupPoolResult(out, _tensor(parts[1], torch.int64, (b, n)), _tensor(parts[2], torch.int64, (b, m))), stdout
