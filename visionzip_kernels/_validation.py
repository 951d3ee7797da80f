"""Argument rules shared by every op (docs/spec.md "Arguments"), the Python half.

Each op module (``compress.py``, ``scores.py``) checks its own shapes with these helpers; the C++
kernels repeat what they need for memory safety with ``TORCH_CHECK`` (``csrc/common.h`` holds the C++
half of the same rules). Everything reached from Python raises ``ValueError`` first, naming the
argument, its shape and the expected form.

Error messages are built only once a check has failed: formatting a symbolic size (SymInt) into a
string under ``torch.compile(dynamic=True)`` would specialise the graph on its value.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of every op: float64 for float64 inputs, float32 otherwise
    (docs/spec.md "Numerics")."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def format_shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(name: str, t: object, form: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {form}; got {type(t).__name__}")
    return t


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64); got dtype {t.dtype}"
        )


def check_same_device(name: str, t: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if t.device != other.device:
        raise ValueError(f"{name} is on {t.device} but {other_name} is on {other.device}; both must be on one device")


def check_int(name: str, value: object, *, optional: bool = False) -> None:
    """An int argument: a Python int or a SymInt, not a bool (numpy integers: convert with int()).

    The op schemas declare these arguments as ``Scalar``, so the C++ ops apply the same rule."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        hint = " (convert it with int())" if type(value).__module__ == "numpy" else ""
        raise ValueError(f"{name} must be an int{' or None' if optional else ''}; got {type(value).__name__}{hint}")


def check_bool(name: str, value: object) -> None:
    """A flag: True or False (a Python bool; not None, an int or a string)."""
    if not isinstance(value, (bool, torch.SymBool)):
        raise ValueError(f"{name} must be a bool (True or False); got {type(value).__name__} {value!r}")


def feature_layer_depth(name: str, value: object, num_layers: int) -> int:
    """Encoder layers that produce ``hidden_states[value]`` of a tower with ``num_layers`` layers
    (hidden_states[0] is the embedding output; LLaVA's vision_feature_layer -2 -> num_layers - 1).
    ValueError naming ``name`` unless ``value`` is an int selecting a layer output."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    depth = value if value >= 0 else num_layers + 1 + value
    if not 1 <= depth <= num_layers:
        raise ValueError(
            f"{name} must select an encoder layer output (1..{num_layers} or -{num_layers}..-1); got {value}"
        )
    return depth


def check_scale(scale: Optional[float]) -> None:
    """The softmax scale of the score ops: None (1/sqrt(d)) or a finite float."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float or None (None: 1/sqrt(d)); got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale}")


def is_tracing(t: torch.Tensor) -> bool:
    """True for fake / traced tensors, whose values cannot (and must not) be read."""
    from torch._subclasses.fake_tensor import FakeTensor

    return torch.compiler.is_compiling() or isinstance(t, FakeTensor) or t.device.type == "meta"
