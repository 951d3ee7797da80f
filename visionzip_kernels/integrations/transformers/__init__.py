"""VisionZip for loaded Hugging Face ``transformers`` vision-language models.

    >>> from visionzip_kernels.integrations.transformers import apply_visionzip, remove_visionzip
    >>> handle = apply_visionzip(model, budget=64, processor=processor)   # patches this instance only
    >>> out = model.generate(**processor(images=img, text=prompt, return_tensors="pt"))
    >>> remove_visionzip(model)                                           # exact inverse

What is patched: only the given model *instance* (and processor instance). Methods are replaced by
entries in the instance ``__dict__`` (the class is untouched, so two models in one process are
independent); :func:`remove_visionzip` deletes those entries again. The vision tower keeps its attention
implementation (SDPA, FlashAttention, eager): per call, temporary forward hooks on the selection layer's
projections capture its q / k, and the scores are computed from them without an N x N matrix.

One module per model family, dispatched by ``config.model_type`` (``_core.FAMILIES``): ``llava``,
``llava_next``, ``llava_onevision``, ``qwen2_vl`` (Qwen2-VL and Qwen2.5-VL). The method is a
reducer (``visionzip_kernels.integrations.core``): :func:`apply_visionzip` applies
:class:`~visionzip_kernels.integrations.core.VisionZip`; :func:`apply_reducer` applies any reducer.
Layouts per model: ``docs/transformers.md``.

The processor must emit as many image placeholders as the model now produces:
:func:`apply_visionzip_processor` (or ``apply_visionzip(..., processor=...)``) patches its
``replace_image_token``; a patched model fed an unpatched processor's input raises a ``ValueError`` that
says so.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..core import Reducer, VisionZip
from . import llava, llava_next, llava_onevision, qwen2_vl, qwen3_vl  # noqa: F401  (register their families)
from ._core import HANDLE_ATTR, Handle, model_family, output_class, patch_processor, processor_family
from ._core import remove_processor_patch as remove_visionzip_processor

#: The handle :func:`apply_visionzip` returns.
VisionZipHandle = Handle

__all__ = [
    "VisionZipHandle",
    "VisionZipImageOutput",  # noqa: F822 - built lazily by __getattr__ (needs transformers)
    "apply_reducer",
    "apply_visionzip",
    "apply_visionzip_processor",
    "remove_visionzip",
    "remove_visionzip_processor",
]


def __getattr__(name: str) -> Any:
    if name == "VisionZipImageOutput":  # built lazily: needs transformers
        return output_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def apply_reducer(model: torch.nn.Module, reducer: Reducer, *, processor: Any = None, **options: Any) -> Handle:
    """Patch one loaded model instance so that its LLM receives the rows ``reducer`` makes of each
    image (see :func:`apply_visionzip`); ``options`` are the family's (e.g. LLaVA-NeXT's ``layout``)."""
    if HANDLE_ATTR in model.__dict__:
        raise RuntimeError("VisionZip is already applied to this model; call remove_visionzip(model) first")
    family, base = model_family(model)
    handle = Handle(model, family, reducer, options)
    try:
        family.patch(handle, base)
        if processor is not None:
            if processor_family(processor) is not family:
                raise TypeError(
                    f"VisionZip: processor {type(processor).__name__} does not match model family {family.name}"
                )
            patch_processor(processor, reducer, options)
            handle.processor = processor
    except BaseException:
        handle.remove()
        raise
    handle.set(model, HANDLE_ATTR, handle)
    return handle


def apply_visionzip(
    model: torch.nn.Module,
    *,
    budget: int = 64,
    dominant: Optional[int] = None,
    contextual: Optional[int] = None,
    backend: Optional[str] = None,
    processor: Any = None,
    layout: Optional[str] = None,
) -> Handle:
    """Patch one loaded model instance so that its LLM receives ``budget`` visual tokens per image.

    Args:
        model: a supported ``...ForConditionalGeneration`` (or its base ``...Model``), already loaded.
        budget: k, tokens kept per image (per crop for LLaVA-NeXT / OneVision).
        dominant / contextual: the split of k (D + Cx = k); default Cx = k * 5 // 32.
        backend: compress backend (see :func:`visionzip_kernels.compress`), None = fastest available.
        processor: optional processor to patch as well (see :func:`apply_visionzip_processor`);
            :meth:`VisionZipHandle.remove` / :func:`remove_visionzip` restore it too.
        layout: LLaVA-NeXT / OneVision only: "official" (VisionZip's own LLaVA-NeXT layout, the
            default for LLaVA-NeXT) or "per_crop" (the default for OneVision); see docs/transformers.md.

    Returns:
        A :class:`VisionZipHandle`; ``remove_visionzip(model)`` or ``handle.remove()`` undoes the patch.
    """
    options = {} if layout is None else {"layout": layout}
    return apply_reducer(model, VisionZip(budget, dominant=dominant, contextual=contextual, backend=backend),
                         processor=processor, **options)


def apply_visionzip_processor(processor: Any, budget: int = 64, *, layout: Optional[str] = None) -> Any:
    """Make ``processor`` expand each image (and video) placeholder to the VisionZip token count, in
    place; ``layout`` as in :func:`apply_visionzip` (it must match the model's).

    LLaVA: ``budget`` per image. LLaVA-NeXT: ``crops * budget`` (official layout) or
    ``crops * budget + 1`` (per crop: one image_newline). OneVision: ``crops * budget + 1`` per image,
    ``frames * budget + 1`` per video. Qwen2-VL / 2.5-VL / Qwen3-VL: ``min(budget, merged tokens)``
    per image and per temporal group of a video. Returns the processor;
    :func:`remove_visionzip_processor` undoes it.
    """
    return patch_processor(processor, VisionZip(budget), {} if layout is None else {"layout": layout})


def remove_visionzip(model: torch.nn.Module) -> None:
    """Undo :func:`apply_visionzip` on ``model`` exactly (raises if it is not patched)."""
    handle = model.__dict__.get(HANDLE_ATTR)
    if handle is None:
        raise ValueError("VisionZip is not applied to this model")
    handle.remove()
