"""visionzip-kernels: fused kernels for VisionZip visual-token compression.

    >>> import visionzip_kernels as vz
    >>> out = vz.compress(hidden, attn, k=64, keys=keys)        # (B, 64, C)

The operator itself is ``torch.ops.visionzip.compress`` (and ``compress_with_indices``).
Scores without the N x N attention matrix (docs/spec.md "Scores"): ``vz.cls_scores(q_cls, k)`` /
``vz.received_scores(q, k)`` give the (B, N) ``attn`` of ``compress`` from a layer's q and k.
Grouping (docs/spec.md "Group pool"): ``vz.group_pool(logits, values)`` pools N patches into M groups
by their argmax logit, a segmented sum instead of the dense one-hot product.

Layout: ``_extension`` loads the compiled library; ``_backends`` is the registry every op selects
through; ``ops/`` one module per op (its checks, fake kernels and entry); ``reference/`` the oracles
side by side; ``triton/`` the Triton backend; ``baseline`` the benchmarks' eager
transcription of the original code; ``integrations/`` transformers and vLLM.
"""

from . import _extension  # loads _C: schemas and C++ kernels
from ._backends import BACKENDS as _BACKEND_TABLE
from .baseline import visionzip_eager
from .ops.compress import (
    CompressPlan,
    CompressResult,
    available_backends,
    check_compress_inputs,
    compress,
    default_contextual,
)
from .reference import (
    cls_scores_reference,
    compress_reference,
    group_pool_reference,
    received_scores_reference,
)
from .ops.group_pool import GroupPoolResult, available_group_pool_backends, group_pool
from .ops.scores import available_score_backends, cls_scores, received_scores

_extension.optional_module("visionzip_kernels.triton")  # Triton custom ops and registry entries, if installed

#: Every backend name the registry declares (``available_backends`` says which run where).
BACKENDS = tuple(_BACKEND_TABLE)

__all__ = [
    "BACKENDS",
    "CompressPlan",
    "CompressResult",
    "GroupPoolResult",
    "available_backends",
    "available_group_pool_backends",
    "available_score_backends",
    "check_compress_inputs",
    "cls_scores",
    "cls_scores_reference",
    "compress",
    "compress_reference",
    "default_contextual",
    "group_pool",
    "group_pool_reference",
    "received_scores",
    "received_scores_reference",
    "visionzip_eager",
]
__version__ = "0.1.0"
