"""Triton backend of ``visionzip::compress``.

Importing this package raises ``ImportError`` when triton is not installed; ``visionzip_kernels.ops``
catches it (``ops.TRITON`` is then None and the "triton" backend is simply not offered).
The ops themselves (``torch.ops.visionzip.compress_triton`` and ``compress_triton_with_indices``) are
registered in ``visionzip_kernels.ops``.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the triton backend of visionzip_kernels needs the `triton` package (pip install 'visionzip-kernels[triton]')"
    ) from exc

from .compress import check_triton_inputs, compress_triton, interpreting, launch_compress

__all__ = ["check_triton_inputs", "compress_triton", "interpreting", "launch_compress"]
