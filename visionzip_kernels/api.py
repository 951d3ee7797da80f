"""Python entry points: :func:`compress` with backend selection, and :func:`available_backends`."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from . import ops
from ._validation import check_compress_inputs
from .reference import CompressResult, compress_reference_from_plan

BACKENDS = ("reference", "cpu", "triton", "cuda")


#: Backends whose kernels do not take float64 hidden states (they raise a clear error).
_NO_FLOAT64 = ("triton", "cuda")


def available_backends(
    device: Union[torch.device, str, None] = None, dtype: Optional[torch.dtype] = None
) -> list[str]:
    """Backends that can run on ``device`` (default: cuda if available, else cpu), fastest first.

    cpu: ["cpu", "reference"] (+ "triton" under ``TRITON_INTERPRET=1``, for testing);
    cuda: ["cuda" if the extension has CUDA kernels, "triton" if triton is installed, "reference"].
    With ``dtype`` (hidden's dtype), backends that do not support it are left out (float64 runs on
    "cpu" and "reference" only).
    """
    names = _device_backends(device)
    if dtype == torch.float64:
        names = [n for n in names if n not in _NO_FLOAT64]
    return names


def _device_backends(device: Union[torch.device, str, None]) -> list[str]:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cpu":
        names = ["cpu", "reference"]
        if ops.TRITON is not None and ops.TRITON.interpreting():
            names.append("triton")
        return names
    if device.type == "cuda":
        names = []
        if ops.HAS_CUDA_KERNELS:
            names.append("cuda")
        if ops.TRITON is not None:
            names.append("triton")
        return names + ["reference"]
    return ["reference"]


def _direct_call_ok(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the Triton launcher may be called without its custom op. The op is what torch.compile,
    torch.jit.trace, autograd, tensor subclasses and dispatch modes see; in plain eager inference it
    only adds the custom op's Python dispatch to a call that is launch-bound at small batches."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor or (grad and t.requires_grad):
            return False
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
    return True


def _backend_ops(backend: str) -> tuple[Callable[..., torch.Tensor], Callable[..., tuple]]:
    """(output-only op, with-indices op) of a compiled backend."""
    if backend == "triton":
        return torch.ops.visionzip.compress_triton, torch.ops.visionzip.compress_triton_with_indices
    # "cpu" and "cuda" are the device kernels of the one C++ op.
    return torch.ops.visionzip.compress, torch.ops.visionzip.compress_with_indices


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
    """Compress B images of N visual tokens to k tokens each (VisionZip, SPEC 1-3).

    Args:
        hidden: (B, N, C) hidden states of the selection layer (float16/bfloat16/float32/float64).
        attn: (B, H, N, N) attention probabilities, (B, H, N) one row per head (the CLS row, or
            attention already reduced over queries), or (B, N) scores.
        k: tokens kept per image: D dominant + Cx contextual.
        keys: (B, N, Ck) similarity metric (the layer's keys averaged over heads); ``hidden`` if None.
        contextual: Cx, the number of merged tokens; ``k * 5 // 32`` if None.
        has_cls: token 0 is a CLS token (scored by its attention row, always kept). False for
            SigLIP / Qwen2-VL encoders: tokens are scored by the attention they receive.
        backend: "reference", "cpu", "triton", "cuda", or None for the fastest available.
        return_indices: also return the indices chosen by the pass.

    Returns:
        (B, k, C) tensor in hidden's dtype: the D dominant rows in ascending token index, then the
        Cx contextual rows; or a :class:`CompressResult` when ``return_indices``.
    """
    plan = check_compress_inputs(hidden, attn, k, keys, contextual, has_cls)
    names = available_backends(hidden.device, hidden.dtype)
    if backend is None:
        backend = names[0]
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}")
    elif backend not in names:
        raise ValueError(
            f"backend {backend!r} is not available for {hidden.dtype} tensors on {hidden.device}; "
            f"available: {names}"
        )
    if backend == "reference":
        result = compress_reference_from_plan(plan, hidden, attn, keys)
        return result if return_indices else result.output
    if backend == "triton" and _direct_call_ok(hidden, attn, keys):
        result = CompressResult(*ops.TRITON.launch_compress(plan, hidden, attn, keys, has_cls))
        return result if return_indices else result.output
    output_op, indices_op = _backend_ops(backend)
    args = (hidden, attn, plan.k)
    kwargs = dict(keys=keys, contextual=plan.contextual, has_cls=has_cls)
    return CompressResult(*indices_op(*args, **kwargs)) if return_indices else output_op(*args, **kwargs)
