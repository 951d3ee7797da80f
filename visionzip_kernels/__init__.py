"""visionzip-kernels: fused kernels for VisionZip visual-token compression.

    >>> import visionzip_kernels as vz
    >>> out = vz.compress(hidden, attn, k=64, keys=keys)        # (B, 64, C)

The operator itself is ``torch.ops.visionzip.compress`` (and ``compress_with_indices``).
Scores without the N x N attention matrix (SPEC 4): ``vz.cls_scores(q_cls, k)`` /
``vz.received_scores(q, k)`` give the (B, N) ``attn`` of ``compress`` from a layer's q and k.
"""

from . import ops  # noqa: F401  (loads the extension and registers fake/Triton kernels)
from ._validation import CompressPlan, check_compress_inputs, default_contextual
from .api import BACKENDS, available_backends, compress
from .reference import CompressResult, compress_reference, visionzip_eager
from .scores import (
    available_score_backends,
    cls_scores,
    cls_scores_reference,
    received_scores,
    received_scores_reference,
)

__all__ = [
    "BACKENDS",
    "CompressPlan",
    "CompressResult",
    "available_backends",
    "available_score_backends",
    "check_compress_inputs",
    "cls_scores",
    "cls_scores_reference",
    "compress",
    "compress_reference",
    "default_contextual",
    "received_scores",
    "received_scores_reference",
    "visionzip_eager",
]
__version__ = "0.1.0"
