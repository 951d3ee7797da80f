"""Triton backend: kernels, launchers and custom ops of ``compress`` (``compress.py``), of the
score ops (``scores.py``) and of ``group_pool`` (``group_pool.py``); helpers in ``_utils.py``, the
segmented reduction compress and group_pool share in ``_segmented.py``.

Importing this package raises ``ImportError`` when triton is not installed; the package's
``__init__`` then leaves it out, and the registry offers no "triton" backend. Importing it registers
the custom ops (``torch.ops.visionzip.compress_triton``, ...) and the registry entries.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the triton backend of visionzip_kernels needs the `triton` package (pip install 'visionzip-kernels[triton]')"
    ) from exc

from . import compress, group_pool, scores  # noqa: F401  (custom ops and registry entries)
from ._utils import interpreting
from .compress import check_triton_inputs, compress_triton, launch_compress

__all__ = ["check_triton_inputs", "compress_triton", "interpreting", "launch_compress"]
