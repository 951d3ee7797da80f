"""The ``compress`` op (docs/spec.md "Compress"): argument checks, fake kernels, public entry.

``torch.ops.visionzip.compress`` / ``compress_with_indices`` are defined in C++ (``csrc/ops.cpp``,
kernels in ``csrc/cpu`` and ``csrc/cuda``); this module gives them their fake kernels (so they trace
under ``torch.compile(fullgraph=True)`` and FakeTensor), registers them as the "cpu" and "cuda"
backends of the registry, and defines :func:`compress`, which validates once and selects a backend
through ``visionzip_kernels._backends``. The oracle is ``visionzip_kernels.reference.compress``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch

from .. import _backends
from .._validation import (
    check_bool,
    check_float,
    check_int,
    check_same_device,
    check_tensor,
    format_shape,
)

__all__ = [
    "CompressPlan",
    "CompressResult",
    "available_backends",
    "check_compress_inputs",
    "compress",
    "contextual_step",
    "default_contextual",
]


def default_contextual(k: int) -> int:
    """Contextual share of a budget ``k`` used by VisionZip: 64 -> 10, 128 -> 20, 192 -> 30."""
    return k * 5 // 32


def contextual_step(remaining: int, contextual: int) -> int:
    """Spacing of the contextual targets inside the remaining list (docs/spec.md "Contextual
    merging"): max(1, R // Cx); 1 when Cx = 0."""
    return torch.sym_max(1, remaining // contextual) if contextual > 0 else 1


@dataclass(frozen=True)
class CompressPlan:
    """Static sizes of one ``compress`` call (Python ints, or SymInts under tracing). Its C++ twin is
    ``CompressPlan`` in ``csrc/compress_common.h``."""

    batch: int
    tokens: int  # N
    channels: int  # C
    dominant: int  # D, CLS included when has_cls
    contextual: int  # Cx
    has_cls: bool

    @property
    def k(self) -> int:
        return self.dominant + self.contextual

    @property
    def remaining(self) -> int:
        return self.tokens - self.dominant

    @property
    def step(self) -> int:
        return contextual_step(self.remaining, self.contextual)


class CompressResult(NamedTuple):
    """Output of a compress pass together with the choices it made (docs/spec.md "Outputs").

    output: (B, k, C), hidden's dtype: dominant rows (ascending token index) then contextual rows.
    dominant_indices: (B, D) int64, ascending token indices of the dominant tokens (CLS first if kept).
    contextual_indices: (B, Cx) int64, token index of each contextual target, in target order.
    token_map: (B, N) int64, the output row each token ends up in: its row in the dominant block,
        D + t for a token merged into (or being) contextual target t, -1 for a token dropped
        (only when Cx = 0).
    """

    output: torch.Tensor
    dominant_indices: torch.Tensor
    contextual_indices: torch.Tensor
    token_map: torch.Tensor


_ATTN_FORMS = {4: "(B, H, N, N)", 3: "(B, H, N)", 2: "(B, N)"}


def _attn_matches(attn: torch.Tensor, b: int, n: int) -> bool:
    s = attn.shape
    if attn.dim() == 4:
        return s[0] == b and s[1] >= 1 and s[2] == n and s[3] == n
    if attn.dim() == 3:
        return s[0] == b and s[1] >= 1 and s[2] == n
    return s[0] == b and s[1] == n


def check_compress_inputs(
    hidden: torch.Tensor,
    attn: torch.Tensor,
    k: int,
    keys: Optional[torch.Tensor] = None,
    contextual: Optional[int] = None,
    has_cls: bool = True,
) -> CompressPlan:
    """Validate the arguments of ``compress`` and return its static sizes.

    hidden: (B, N, C); attn: (B, H, N, N), (B, H, N) or (B, N); keys: (B, N, Ck) or None; k and
    contextual ints, has_cls a bool (docs/spec.md "Arguments"). Raises ``ValueError`` naming the
    offending argument.
    """
    check_tensor("hidden", hidden, "(B, N, C)")
    check_tensor("attn", attn, "(B, H, N, N), (B, H, N) or (B, N)")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape (B, N, C); got a {hidden.dim()}-D tensor of shape {format_shape(hidden)}")
    check_float("hidden", hidden)
    b, n, c = hidden.shape
    if n < 1 or c < 1:
        raise ValueError(f"hidden must have N >= 1 tokens and C >= 1 channels; got shape {format_shape(hidden)}")

    check_float("attn", attn)
    if attn.dim() not in _ATTN_FORMS:
        raise ValueError(
            f"attn must have shape (B, H, N, N), (B, H, N) or (B, N); got a {attn.dim()}-D tensor of shape "
            f"{format_shape(attn)}"
        )
    if not _attn_matches(attn, b, n):
        form = _ATTN_FORMS[attn.dim()]
        sizes = form.replace("B", str(b)).replace("N", str(n))
        raise ValueError(
            f"attn of shape {format_shape(attn)} does not match hidden {format_shape(hidden)}: expected {form} = {sizes}"
        )
    check_same_device("attn", attn, "hidden", hidden)

    if keys is not None:
        check_tensor("keys", keys, "(B, N, Ck) or None")
        if keys.dim() != 3 or keys.shape[0] != b or keys.shape[1] != n or keys.shape[2] < 1:
            raise ValueError(
                f"keys must have shape (B, N, Ck) = ({b}, {n}, Ck) to match hidden {format_shape(hidden)}; "
                f"got {format_shape(keys)}"
            )
        check_float("keys", keys)
        check_same_device("keys", keys, "hidden", hidden)

    check_int("k", k)
    check_int("contextual", contextual, optional=True)
    check_bool("has_cls", has_cls)
    if k < 1 or k > n:
        raise ValueError(f"k must satisfy 1 <= k <= N = {n} (hidden {format_shape(hidden)}); got k={k}")
    if contextual is None:
        contextual = default_contextual(k)
    if contextual < 0:
        raise ValueError(f"contextual must be >= 0; got contextual={contextual}")
    dominant = k - contextual
    if dominant < 0:
        raise ValueError(
            f"contextual={contextual} exceeds the budget k={k}: the contextual tokens are part of k "
            f"(k - contextual dominant tokens are kept), so contextual must be at most k"
        )
    if has_cls and dominant < 1:
        raise ValueError(
            f"with has_cls=True the CLS token is kept inside the dominant budget, so k - contextual must be >= 1; "
            f"got k={k}, contextual={contextual} (dominant budget 0)"
        )
    return CompressPlan(batch=b, tokens=n, channels=c, dominant=dominant, contextual=contextual, has_cls=has_cls)


def empty_outputs(hidden: torch.Tensor, plan: CompressPlan) -> tuple[torch.Tensor, ...]:
    """Uninitialised (output, dominant_indices, contextual_indices, token_map) for ``plan``."""
    b, idx = plan.batch, dict(dtype=torch.long)
    return (
        hidden.new_empty((b, plan.k, plan.channels)),
        hidden.new_empty((b, plan.dominant), **idx),
        hidden.new_empty((b, plan.contextual), **idx),
        hidden.new_empty((b, plan.tokens), **idx),
    )


# ------------------------------------------------------------------------------------------------
# Fake kernels of the C++ ops, and the ops as the "cpu" / "cuda" backends
# ------------------------------------------------------------------------------------------------


@torch.library.register_fake("visionzip::compress")
def _compress_fake(hidden, attn, k, *, keys=None, contextual=None, has_cls=True) -> torch.Tensor:
    return empty_outputs(hidden, check_compress_inputs(hidden, attn, k, keys, contextual, has_cls))[0]


@torch.library.register_fake("visionzip::compress_with_indices")
def _compress_with_indices_fake(hidden, attn, k, *, keys=None, contextual=None, has_cls=True):
    return empty_outputs(hidden, check_compress_inputs(hidden, attn, k, keys, contextual, has_cls))


@torch.library.register_fake("visionzip::_compress_cpu_phases")
def _compress_cpu_phases_fake(hidden, attn, k, *, keys=None, contextual=None, has_cls=True):
    output = empty_outputs(hidden, check_compress_inputs(hidden, attn, k, keys, contextual, has_cls))[0]
    return hidden.new_empty((6,), dtype=torch.float64), output


def _extension_compress(
    plan: CompressPlan, hidden: torch.Tensor, attn: torch.Tensor, keys: Optional[torch.Tensor], with_indices: bool
) -> Union[torch.Tensor, CompressResult]:
    """The C++ op, which dispatches on the device: its CPU kernel, or its CUDA kernel."""
    args = (hidden, attn, plan.k)
    kwargs = dict(keys=keys, contextual=plan.contextual, has_cls=plan.has_cls)
    if with_indices:
        return CompressResult(*torch.ops.visionzip.compress_with_indices(*args, **kwargs))
    return torch.ops.visionzip.compress(*args, **kwargs)


_backends.register("compress", "cpu", _extension_compress)
_backends.register("compress", "cuda", _extension_compress)


# ------------------------------------------------------------------------------------------------
# Public entry
# ------------------------------------------------------------------------------------------------


def available_backends(
    device: Union[torch.device, str, None] = None, dtype: Optional[torch.dtype] = None
) -> list[str]:
    """Backends of ``compress`` that run on ``device`` (default: cuda if available, else cpu),
    fastest first; with ``dtype`` (hidden's), only those that take it.

    cpu: ["cpu", "reference"] (+ "triton" under ``TRITON_INTERPRET=1``, for testing);
    cuda: ["cuda" if the extension has CUDA kernels, "triton" if triton is installed, "reference"];
    float64 runs on "cpu" and "reference" only.
    """
    return _backends.available("compress", device, dtype)


def compress(
    hidden: torch.Tensor,
    attn: torch.Tensor,
    k: int,
    *,
    keys: Optional[torch.Tensor] = None,
    contextual: Optional[int] = None,
    has_cls: bool = True,
    backend: Optional[str] = None,
    return_indices: bool = False,
) -> Union[torch.Tensor, CompressResult]:
    """Compress B images of N visual tokens to k tokens each (VisionZip, docs/spec.md "Compress").

    Args:
        hidden: (B, N, C) hidden states of the selection layer (float16/bfloat16/float32/float64).
        attn: (B, H, N, N) attention probabilities, (B, H, N) one row per head (the CLS row, or
            attention already reduced over queries), or (B, N) scores.
        k: tokens kept per image: D dominant + Cx contextual.
        keys: (B, N, Ck) similarity metric (the layer's keys averaged over heads); ``hidden`` if None.
        contextual: Cx, the number of merged tokens; ``k * 5 // 32`` if None.
        has_cls: token 0 is a CLS token (scored by its attention row, always kept). False for
            SigLIP / Qwen2-VL encoders: tokens are scored by the attention they receive.
        backend: a name of :func:`available_backends`, or None for the fastest available.
        return_indices: also return the indices chosen by the pass.

    Returns:
        (B, k, C) tensor in hidden's dtype: the D dominant rows in ascending token index, then the
        Cx contextual rows; or a :class:`CompressResult` when ``return_indices``.
    """
    plan = check_compress_inputs(hidden, attn, k, keys, contextual, has_cls)
    _, impl = _backends.select("compress", backend, hidden.device, hidden.dtype)
    return impl(plan, hidden, attn, keys, bool(return_indices))
