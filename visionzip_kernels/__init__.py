"""visionzip-kernels: fused kernels for VisionZip visual-token compression.

    >>> import visionzip_kernels as vz
    >>> out = vz.compress(hidden, attn, k=64, keys=keys)        # (B, 64, C)

The operator itself is ``torch.ops.visionzip.compress`` (and ``compress_with_indices``).
"""

from . import ops  # noqa: F401  (loads the extension and registers fake/Triton kernels)
from ._validation import CompressPlan, check_compress_inputs, default_contextual
from .api import BACKENDS, available_backends, compress
from .reference import CompressResult, compress_reference, visionzip_eager

__all__ = [
    "BACKENDS",
    "CompressPlan",
    "CompressResult",
    "available_backends",
    "check_compress_inputs",
    "compress",
    "compress_reference",
    "default_contextual",
    "visionzip_eager",
]
__version__ = "0.1.0"
