"""Argument checking shared by the Python entry points, the fake kernels and the Python backends.

The C++ kernels repeat the checks they need for memory safety with ``TORCH_CHECK`` (a
``RuntimeError``); everything reached from Python raises the ``ValueError`` below first, so the
message a user sees names the argument, its shape and the expected form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def default_contextual(k: int) -> int:
    """Contextual share of a budget ``k`` used by VisionZip: 64 -> 10, 128 -> 20, 192 -> 30."""
    return k * 5 // 32


def contextual_step(remaining: int, contextual: int) -> int:
    """Spacing of the contextual targets inside the remaining list (SPEC 1.6): max(1, R // Cx)."""
    return max(1, remaining // contextual) if contextual > 0 else 1


@dataclass(frozen=True)
class CompressPlan:
    """Static sizes of one ``compress`` call (all Python ints, or SymInts under tracing)."""

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
        """Spacing of the contextual targets inside the remaining list (SPEC 1.6)."""
        return contextual_step(self.remaining, self.contextual)


def format_shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64); got dtype {t.dtype}"
        )


def check_compress_inputs(
    hidden: torch.Tensor,
    attn: torch.Tensor,
    k: int,
    keys: Optional[torch.Tensor] = None,
    contextual: Optional[int] = None,
    has_cls: bool = True,
) -> CompressPlan:
    """Validate the arguments of ``compress`` and return its static sizes.

    hidden: (B, N, C); attn: (B, H, N, N), (B, H, N) or (B, N); keys: (B, N, Ck) or None.
    Raises ``ValueError`` naming the offending argument.
    """
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"hidden must be a torch.Tensor of shape (B, N, C); got {type(hidden).__name__}")
    if not isinstance(attn, torch.Tensor):
        raise ValueError(f"attn must be a torch.Tensor; got {type(attn).__name__}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape (B, N, C); got a {hidden.dim()}-D tensor of shape {format_shape(hidden)}")
    _check_float("hidden", hidden)
    b, n, c = hidden.shape
    if n < 1 or c < 1:
        raise ValueError(f"hidden must have N >= 1 tokens and C >= 1 channels; got shape {format_shape(hidden)}")

    _check_float("attn", attn)
    if attn.dim() == 4:
        expected = f"(B, H, N, N) = ({b}, H, {n}, {n})"
        ok = attn.shape[0] == b and attn.shape[2] == n and attn.shape[3] == n and attn.shape[1] >= 1
    elif attn.dim() == 3:
        expected = f"(B, H, N) = ({b}, H, {n})"
        ok = attn.shape[0] == b and attn.shape[2] == n and attn.shape[1] >= 1
    elif attn.dim() == 2:
        expected = f"(B, N) = ({b}, {n})"
        ok = attn.shape[0] == b and attn.shape[1] == n
    else:
        raise ValueError(
            f"attn must have shape (B, H, N, N), (B, H, N) or (B, N); got a {attn.dim()}-D tensor of shape {format_shape(attn)}"
        )
    if not ok:
        raise ValueError(
            f"attn of shape {format_shape(attn)} does not match hidden {format_shape(hidden)}: expected {expected}"
        )
    if attn.device != hidden.device:
        raise ValueError(f"attn is on {attn.device} but hidden is on {hidden.device}; both must be on one device")

    if keys is not None:
        if not isinstance(keys, torch.Tensor):
            raise ValueError(f"keys must be a torch.Tensor of shape (B, N, Ck) or None; got {type(keys).__name__}")
        if keys.dim() != 3 or keys.shape[0] != b or keys.shape[1] != n or keys.shape[2] < 1:
            raise ValueError(
                f"keys must have shape (B, N, Ck) = ({b}, {n}, Ck) to match hidden {format_shape(hidden)}; got {format_shape(keys)}"
            )
        _check_float("keys", keys)
        if keys.device != hidden.device:
            raise ValueError(f"keys is on {keys.device} but hidden is on {hidden.device}; both must be on one device")

    if isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)):
        raise ValueError(f"k must be an int; got {type(k).__name__}")
    if k < 1 or k > n:
        raise ValueError(f"k must satisfy 1 <= k <= N = {n} (hidden {format_shape(hidden)}); got k={k}")
    if contextual is None:
        contextual = default_contextual(k)
    elif isinstance(contextual, bool) or not isinstance(contextual, (int, torch.SymInt)):
        raise ValueError(f"contextual must be an int or None; got {type(contextual).__name__}")
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
    return CompressPlan(batch=b, tokens=n, channels=c, dominant=dominant, contextual=contextual, has_cls=bool(has_cls))
