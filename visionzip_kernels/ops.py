"""The one place where the ``torch.ops.visionzip`` operators get their Python-side registrations.

The schemas live in C++ (``csrc/ops.cpp``) so libtorch users have them too. Importing this module
loads that library and adds what only Python can provide:

* fake (meta) kernels, so the ops trace under ``torch.compile(fullgraph=True)`` and FakeTensor;
* the Triton implementations, as their own custom ops (``visionzip::compress_triton``), and as the
  CUDA kernel of ``visionzip::compress`` when the extension was built without CUDA kernels.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from ._validation import CompressPlan, check_compress_inputs

try:
    from . import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "visionzip_kernels._C is not built. Run `make build` (or `pip install -e .`) in the repository first."
    ) from exc


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)


#: True when the compiled extension carries the hand-written CUDA kernels (backend "cuda").
HAS_CUDA_KERNELS: bool = _has_kernel("visionzip::compress", "CUDA")


def empty_outputs(hidden: torch.Tensor, plan: CompressPlan) -> tuple[torch.Tensor, ...]:
    """Uninitialised (output, dominant_indices, contextual_indices, token_map) for ``plan``."""
    b, idx = plan.batch, dict(dtype=torch.long)
    return (
        hidden.new_empty((b, plan.k, plan.channels)),
        hidden.new_empty((b, plan.dominant), **idx),
        hidden.new_empty((b, plan.contextual), **idx),
        hidden.new_empty((b, plan.tokens), **idx),
    )


@torch.library.register_fake("visionzip::compress")
def _compress_fake(
    hidden: torch.Tensor,
    attn: torch.Tensor,
    k: int,
    *,
    keys: Optional[torch.Tensor] = None,
    contextual: Optional[int] = None,
    has_cls: bool = True,
) -> torch.Tensor:
    plan = check_compress_inputs(hidden, attn, k, keys, contextual, has_cls)
    return hidden.new_empty((plan.batch, plan.k, plan.channels))


@torch.library.register_fake("visionzip::compress_with_indices")
def _compress_with_indices_fake(
    hidden: torch.Tensor,
    attn: torch.Tensor,
    k: int,
    *,
    keys: Optional[torch.Tensor] = None,
    contextual: Optional[int] = None,
    has_cls: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return empty_outputs(hidden, check_compress_inputs(hidden, attn, k, keys, contextual, has_cls))


# ============================================================================================
# Attention scores without the N x N matrix (SPEC 4): visionzip::cls_scores / received_scores.
# Fake kernels of the C++ ops, and the Triton implementations as their own custom ops
# (visionzip::cls_scores_triton / received_scores_triton), which also serve as the CUDA kernels of
# the C++ ops when the extension has none. Tensor arguments of custom_op cannot be keyword-only,
# so the Triton ops take (q, k[, cu_seqlens], scale) positionally.
# ============================================================================================

from .scores import check_cls_scores_inputs, check_received_scores_inputs, score_dtype  # noqa: E402


@torch.library.register_fake("visionzip::cls_scores")
def _cls_scores_fake(q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None) -> torch.Tensor:
    b, n = check_cls_scores_inputs(q, k, scale)
    return q.new_empty((b, n), dtype=score_dtype(q.dtype))


@torch.library.register_fake("visionzip::received_scores")
def _received_scores_fake(
    q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None
) -> torch.Tensor:
    b, n = check_received_scores_inputs(q, k, scale, cu_seqlens, check_values=False)
    return q.new_empty((b, n), dtype=score_dtype(q.dtype))


def _optional_module(name: str):
    """A module of the Triton backend, or None where triton is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


_TRITON_SCORES = _optional_module("visionzip_kernels.triton.scores")

#: True when the Triton score ops (visionzip::cls_scores_triton, ...) are registered.
HAS_TRITON_SCORES: bool = _TRITON_SCORES is not None

if HAS_TRITON_SCORES:

    @torch.library.custom_op("visionzip::cls_scores_triton", mutates_args=())
    def _cls_scores_triton(q: torch.Tensor, k: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
        """Triton cls_scores: q (B, H, d), k (B, H, N, d) -> (B, N) float32."""
        check_cls_scores_inputs(q, k, scale)
        return _TRITON_SCORES.cls_scores_triton(q, k, scale)

    @_cls_scores_triton.register_fake
    def _(q: torch.Tensor, k: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
        b, n = check_cls_scores_inputs(q, k, scale)
        return q.new_empty((b, n), dtype=torch.float32)

    @torch.library.custom_op("visionzip::received_scores_triton", mutates_args=())
    def _received_scores_triton(
        q: torch.Tensor, k: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, scale: Optional[float] = None
    ) -> torch.Tensor:
        """Triton received_scores: q, k (B, H, N, d), cu_seqlens (S + 1,) or None -> (B, N) float32.
        cu_seqlens values are not read here (no host sync); the Python API checks them in eager mode."""
        check_received_scores_inputs(q, k, scale, cu_seqlens, check_values=False)
        return _TRITON_SCORES.received_scores_triton(q, k, cu_seqlens, scale)

    @_received_scores_triton.register_fake
    def _(
        q: torch.Tensor, k: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, scale: Optional[float] = None
    ) -> torch.Tensor:
        b, n = check_received_scores_inputs(q, k, scale, cu_seqlens, check_values=False)
        return q.new_empty((b, n), dtype=torch.float32)

    # CUDA kernels of the C++ ops, where the extension brings none (float64 is not supported there).
    if not _has_kernel("visionzip::cls_scores", "CUDA"):

        @torch.library.impl("visionzip::cls_scores", "CUDA")
        def _cls_scores_cuda(q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None) -> torch.Tensor:
            return _TRITON_SCORES.cls_scores_triton(q, k, scale)

    if not _has_kernel("visionzip::received_scores", "CUDA"):

        @torch.library.impl("visionzip::received_scores", "CUDA")
        def _received_scores_cuda(
            q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None
        ) -> torch.Tensor:
            return _TRITON_SCORES.received_scores_triton(q, k, cu_seqlens, scale)

# ============================ end of the attention-scores section ============================

TRITON = _optional_module("visionzip_kernels.triton")


# =============================================================================================
# Triton backend (issue 4): custom ops wrapping the Triton launch, and the CUDA kernel of
# visionzip::compress when the extension has none. Nothing here runs without triton installed.
# =============================================================================================

if TRITON is not None:

    def _triton_fake_outputs(
        hidden: torch.Tensor,
        attn: torch.Tensor,
        k: int,
        keys: Optional[torch.Tensor],
        contextual: Optional[int],
        has_cls: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return empty_outputs(hidden, TRITON.check_triton_inputs(hidden, attn, k, keys, contextual, has_cls))

    @torch.library.custom_op("visionzip::compress_triton", mutates_args=(), device_types=("cuda", "cpu"))
    def _compress_triton(
        hidden: torch.Tensor,
        attn: torch.Tensor,
        k: int,
        keys: Optional[torch.Tensor] = None,  # not keyword-only: custom_op forbids kwarg-only tensors
        contextual: Optional[int] = None,
        has_cls: bool = True,
    ) -> torch.Tensor:
        """Triton kernel of compress: (B, k, C). CPU tensors only under TRITON_INTERPRET=1."""
        return TRITON.compress_triton(hidden, attn, k, keys, contextual, has_cls)[0]

    @_compress_triton.register_fake
    def _compress_triton_fake(hidden, attn, k, keys=None, contextual=None, has_cls=True):
        return _triton_fake_outputs(hidden, attn, k, keys, contextual, has_cls)[0]

    @torch.library.custom_op(
        "visionzip::compress_triton_with_indices", mutates_args=(), device_types=("cuda", "cpu")
    )
    def _compress_triton_with_indices(
        hidden: torch.Tensor,
        attn: torch.Tensor,
        k: int,
        keys: Optional[torch.Tensor] = None,  # not keyword-only: custom_op forbids kwarg-only tensors
        contextual: Optional[int] = None,
        has_cls: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Triton kernel of compress_with_indices: (output, dominant_indices, contextual_indices, token_map)."""
        return TRITON.compress_triton(hidden, attn, k, keys, contextual, has_cls)

    @_compress_triton_with_indices.register_fake
    def _compress_triton_with_indices_fake(hidden, attn, k, keys=None, contextual=None, has_cls=True):
        return _triton_fake_outputs(hidden, attn, k, keys, contextual, has_cls)

    # Autograd of the Triton ops: the same formula as the C++ ops (visionzip::_compress_hidden_grad).
    def _triton_setup(ctx, inputs, output):
        hidden, attn, k, keys, contextual, has_cls = inputs
        ctx.save_for_backward(hidden, attn, keys)
        ctx.args = (k, contextual, has_cls)

    def _triton_backward(ctx, grad_out):
        hidden, attn, keys = ctx.saved_tensors
        # The forward kept no indices: recompute them (a second pass, only when training through the op).
        _, dom, ctx_idx, token_map = torch.ops.visionzip.compress_triton_with_indices(
            hidden.detach(), attn.detach(), ctx.args[0], None if keys is None else keys.detach(), *ctx.args[1:]
        )
        grad = torch.ops.visionzip._compress_hidden_grad(grad_out, token_map, ctx_idx, dom.shape[1])
        return grad, None, None, None, None, None

    def _triton_indices_setup(ctx, inputs, output):
        ctx.save_for_backward(output[2], output[3])
        ctx.dominant = output[1].shape[1]

    def _triton_indices_backward(ctx, grad_out, *_index_grads):
        ctx_idx, token_map = ctx.saved_tensors
        grad = torch.ops.visionzip._compress_hidden_grad(grad_out, token_map, ctx_idx, ctx.dominant)
        return grad, None, None, None, None, None

    _compress_triton.register_autograd(_triton_backward, setup_context=_triton_setup)
    _compress_triton_with_indices.register_autograd(_triton_indices_backward, setup_context=_triton_indices_setup)

    if not HAS_CUDA_KERNELS:
        # The extension was built without CUDA kernels: visionzip::compress on CUDA tensors runs the
        # Triton kernels (which, like the CUDA kernels, reject float64 with a clear error).
        @torch.library.impl("visionzip::compress", "CUDA")
        def _compress_cuda_triton(hidden, attn, k, *, keys=None, contextual=None, has_cls=True):
            return TRITON.compress_triton(hidden, attn, k, keys, contextual, has_cls)[0]

        @torch.library.impl("visionzip::compress_with_indices", "CUDA")
        def _compress_with_indices_cuda_triton(hidden, attn, k, *, keys=None, contextual=None, has_cls=True):
            return TRITON.compress_triton(hidden, attn, k, keys, contextual, has_cls)
