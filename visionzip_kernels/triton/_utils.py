"""Helpers every Triton launcher of the package shares: the interpreter check, block sizes, the SM
count and the channel split of the compress kernel, and when a launcher may be called without its
custom op."""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton

#: Programs per image of the compress kernel (channel slices) when set; None picks them from the
#: batch and the SM count. Tests and tools/check_triton_build.py set it.
CHANNEL_SPLITS: Optional[int] = None
#: Fewest output channels one program writes when the choice is automatic (256 fp16 = 512-byte rows).
MIN_SPLIT_CHANNELS = 256


@triton.jit
def _probe():
    pass


def interpreting() -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 set before the
    kernels were decorated, i.e. before the package was imported)."""
    return not isinstance(_probe, triton.runtime.JITFunction)


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def channel_splits(batch: int, channels: int, metric_is_hidden: bool, device: torch.device) -> int:
    """Programs per image of the compress kernel: enough for about two programs per SM, each writing
    at least MIN_SPLIT_CHANNELS channels; at most 2 when the hidden states are the metric (every
    program reads all of them for the assignment). 1 in the interpreter, where each program instance
    costs time."""
    if CHANNEL_SPLITS is not None:
        return max(1, min(int(CHANNEL_SPLITS), channels))
    if device.type != "cuda" or batch == 0:
        return 1
    want = -(-2 * sm_count(device.index if device.index is not None else torch.cuda.current_device()) // batch)
    cap = max(1, channels // MIN_SPLIT_CHANNELS)
    return max(1, min(want, cap, 2 if metric_is_hidden else cap))


def direct_call_ok(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a launcher may be called without its custom op. The op is what torch.compile,
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


def check_device(name: str, t: torch.Tensor) -> None:
    """ValueError unless ``t`` can go to a Triton kernel: CUDA, or CPU under the interpreter."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
        return
    raise ValueError(
        f"the triton backend needs CUDA tensors; {name} is on {t.device}"
        + (" (CPU tensors run only in Triton's interpreter, TRITON_INTERPRET=1 set before import)"
           if t.device.type == "cpu" else "")
    )
