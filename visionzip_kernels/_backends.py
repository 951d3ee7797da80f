"""The one registry that selects a backend for every op.

A backend declares here its name, where it runs, and for each op it implements the dtypes it takes
(:data:`BACKENDS`). The modules that hold the implementations register a callable for a declared
(op, backend) pair with :func:`register` when they are imported (the reference and the extension ops
always, the Triton ones when triton is installed). The public entry points select through
:func:`select`; nothing outside this module compares backend names.

To add a backend: declare it in :data:`BACKENDS` and :data:`PREFERENCE`, and register its
implementations from its own module (see README "Extending the package").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import torch

from . import _extension

ALL_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
#: The GPU kernels hold float32 scores and accumulate in float32: no float64 inputs.
HALF_AND_FLOAT = frozenset({torch.float16, torch.bfloat16, torch.float32})

#: Op names of the registry (the torch.ops.visionzip schema names).
OPS = ("compress", "cls_scores", "received_scores", "group_pool")


def _always(device_type: str) -> bool:
    return True


def _cuda_kernels(device_type: str) -> bool:
    return _extension.HAS_CUDA_KERNELS


def _triton_runs_on(device_type: str) -> bool:
    # CUDA tensors on a GPU; CPU tensors only in Triton's interpreter (tests). Imported lazily: the
    # triton package registers its implementations only when triton is installed.
    from .triton._utils import interpreting

    return device_type == "cuda" or interpreting()


@dataclass(frozen=True)
class Backend:
    """A backend: the device types it can run on, whether it is usable there in this process, and the
    dtypes (of the op's main input: hidden, q / k, or values) each of its ops takes."""

    name: str
    devices: Optional[frozenset[str]]  # None: any device (pure PyTorch)
    usable: Callable[[str], bool]
    ops: Mapping[str, frozenset[torch.dtype]]
    what: str


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("reference", None, _always,
                {op: ALL_FLOATS for op in OPS}, "PyTorch reference, the correctness oracle (any device)"),
        Backend("cpu", frozenset({"cpu"}), _always,
                {op: ALL_FLOATS for op in OPS}, "fused C++ kernels (csrc/cpu)"),
        Backend("triton", frozenset({"cuda", "cpu"}), _triton_runs_on,
                {op: HALF_AND_FLOAT for op in OPS}, "Triton kernels (visionzip_kernels/triton)"),
        Backend("cuda", frozenset({"cuda"}), _cuda_kernels,
                {"compress": HALF_AND_FLOAT, "group_pool": HALF_AND_FLOAT}, "hand-written CUDA kernels (csrc/cuda)"),
    )
}

#: Fastest first, per device type; other device types get the reference only. Triton on CPU tensors
#: is its interpreter: last, for tests.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference", "triton"),
}

_IMPLS: dict[tuple[str, str], Callable] = {}


def register(op: str, backend: str, fn: Callable) -> Callable:
    """Register ``fn`` as ``backend``'s implementation of ``op`` (a pair declared in BACKENDS)."""
    if backend not in BACKENDS or op not in BACKENDS[backend].ops:
        raise ValueError(f"backend {backend!r} does not declare op {op!r} in visionzip_kernels._backends.BACKENDS")
    _IMPLS[(op, backend)] = fn
    return fn


def _device_type(device: Union[torch.device, str, None]) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def available(op: str, device: Union[torch.device, str, None] = None, dtype: Optional[torch.dtype] = None) -> list[str]:
    """Backends that run ``op`` on ``device`` (default: cuda if available, else cpu), fastest first;
    with ``dtype``, only those that take it."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}; got {op!r}")
    device_type = _device_type(device)
    names = []
    for name in PREFERENCE.get(device_type, ("reference",)):
        b = BACKENDS[name]
        if (op, name) not in _IMPLS or (b.devices is not None and device_type not in b.devices):
            continue
        if dtype is not None and dtype not in b.ops[op]:
            continue
        if b.usable(device_type):
            names.append(name)
    return names


def check_name(backend: Optional[str]) -> None:
    """ValueError unless ``backend`` is None or a declared backend name."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {tuple(BACKENDS)} or None; got {backend!r}")


def select(op: str, backend: Optional[str], device: torch.device, dtype: torch.dtype) -> tuple[str, Callable]:
    """(name, implementation) of ``backend`` for ``op`` on ``device`` / ``dtype``; the fastest available
    when ``backend`` is None. ValueError saying why a named backend cannot run there."""
    check_name(backend)
    names = available(op, device, dtype)
    if backend is None:
        if not names:  # pragma: no cover - the reference takes every float dtype on every device
            raise ValueError(f"no backend runs {op} for {dtype} tensors on {device}")
        return names[0], _IMPLS[(op, names[0])]
    if backend not in names:
        b = BACKENDS[backend]
        if op not in b.ops:
            why = f"backend {backend!r} does not implement {op}"
        elif dtype not in b.ops[op]:
            takes = ", ".join(str(d).replace("torch.", "") for d in sorted(b.ops[op], key=str))
            why = f"backend {backend!r} takes {takes} inputs for {op}, not {dtype}"
        else:
            why = f"backend {backend!r} is not available for {op} on {device}"
        raise ValueError(f"{why}; available for {dtype} on {device}: {names}")
    return backend, _IMPLS[(op, backend)]
