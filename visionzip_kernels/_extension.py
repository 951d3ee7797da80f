"""The compiled extension ``visionzip_kernels._C`` and what it brings; nothing else loads it.

Importing ``_C`` runs its ``TORCH_LIBRARY`` blocks: the operator schemas (``csrc/ops.cpp``) and the
C++ kernels (CPU always, CUDA when the extension was built with them). The Python-side
registrations (fake kernels, Triton custom ops) live with their op (``compress.py``, ``scores.py``,
``triton/``).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

import torch

try:
    from . import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "visionzip_kernels._C is not built. Run `make build` (or `pip install --no-build-isolation -e .`) "
        "in the repository first."
    ) from exc


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether operator ``op`` (e.g. "visionzip::compress") has a kernel for ``dispatch_key``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)


#: True when the compiled extension carries the hand-written CUDA kernels (backend "cuda"). Read
#: before the Triton package registers itself as the CUDA kernel of ops that have none.
HAS_CUDA_KERNELS: bool = has_kernel("visionzip::compress", "CUDA")


def optional_module(name: str) -> Optional[ModuleType]:
    """Import ``name``, or None where an optional dependency of it (triton) is missing."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
