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

VisToG (docs/vistog.md, LLaVA-1.5 family): :func:`apply_vistog` with a trained
:class:`~visionzip_kernels.methods.vistog.VisToG` module feeds M grouped tokens per image;
:func:`remove_vistog` undoes it.

The processor must emit as many image placeholders as the model now produces:
:func:`apply_visionzip_processor` (or ``apply_visionzip(..., processor=...)``) patches its
``replace_image_token``; a patched model fed an unpatched processor's input raises a ``ValueError`` that
says so.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ...methods.vistog import VisToG
from ..core import Reducer, VisionZip, VisToGReducer
from . import llava, llava_next, llava_onevision, qwen2_vl, qwen3_vl  # noqa: F401  (register their families)
from ._core import FAMILIES, HANDLE_ATTR, Handle, model_family, output_class, patch_processor, processor_family
from ._core import remove_processor_patch as remove_visionzip_processor

#: The handle :func:`apply_visionzip` returns.
VisionZipHandle = Handle

__all__ = [
    "VisionZipHandle",
    "VisionZipImageOutput",  # noqa: F822 - built lazily by __getattr__ (needs transformers)
    "apply_reducer",
    "apply_visionzip",
    "apply_visionzip_processor",
    "apply_vistog",
    "apply_vistog_processor",
    "remove_visionzip",
    "remove_visionzip_processor",
    "remove_vistog",
]


def __getattr__(name: str) -> Any:
    if name == "VisionZipImageOutput":  # built lazily: needs transformers
        return output_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def apply_reducer(model: torch.nn.Module, reducer: Reducer, *, processor: Any = None, **options: Any) -> Handle:
    """Patch one loaded model instance so that its LLM receives the rows ``reducer`` makes of each
    image (see :func:`apply_visionzip`); ``options`` are the family's (e.g. LLaVA-NeXT's ``layout``)."""
    current = model.__dict__.get(HANDLE_ATTR)
    if current is not None:
        raise RuntimeError(
            f"{current.reducer.name} is already applied to this model; call remove_"
            f"{current.reducer.name.lower()}(model) first"
        )
    family, base = model_family(model)
    side_car = reducer.side_car_tokens()
    if side_car is not None:
        if not family.side_car:
            raise NotImplementedError(
                f"{reducer.name}: model family {family.name} does not run side-car tokens through its tower; "
                f"supported: {', '.join(sorted({f.name for f in FAMILIES.values() if f.side_car}))}"
            )
        tower_param = next(base.vision_tower.parameters())
        if side_car.tokens.device != tower_param.device:
            raise ValueError(
                f"{reducer.name}: the module is on {side_car.tokens.device} but the vision tower is on "
                f"{tower_param.device}; move it with module.to({str(tower_param.device)!r})"
            )
    handle = Handle(model, family, reducer, options)
    try:
        family.patch(handle, base)
        if processor is not None:
            if processor_family(processor) is not family:
                raise TypeError(
                    f"{reducer.name}: processor {type(processor).__name__} does not match model family {family.name}"
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
    """Undo :func:`apply_visionzip` (or any :func:`apply_reducer`) on ``model`` exactly (raises if it
    is not patched)."""
    handle = model.__dict__.get(HANDLE_ATTR)
    if handle is None:
        raise ValueError("VisionZip is not applied to this model")
    handle.remove()


def apply_vistog(model: torch.nn.Module, module: VisToG, *, processor: Any = None) -> Handle:
    """Patch one loaded LLaVA-1.5 model instance so that its LLM receives ``module.num_tokens`` (M)
    VisToG tokens per image (docs/vistog.md).

    The vision tower runs unmodified (its own attention implementation); the semantic tokens ride
    beside it with isolated attention up to ``vision_feature_layer`` (a side-car), the grouping layer
    pools that layer's patches into M rows, and the projector maps them. The module is used as is
    (not copied, not registered in the model): its mode decides Gumbel noise (``module.eval()`` for
    inference), it must sit on the tower's device (any float dtype: inputs are cast to it), and
    training it through the model works (gradients reach the module; the tower needs none).

    Args:
        model: a ``LlavaForConditionalGeneration`` (or its ``LlavaModel``), already loaded.
        module: a trained :class:`~visionzip_kernels.methods.vistog.VisToG` of the tower's width.
        processor: optional processor to patch as well (emits M placeholders per image).

    Returns:
        The handle; :func:`remove_vistog` or ``handle.remove()`` undoes the patch exactly.
    """
    reducer = VisToGReducer(module)
    width = model_family(model)[1].config.vision_config.hidden_size
    if module.hidden_size != width:
        raise ValueError(f"module.hidden_size is {module.hidden_size} but the vision tower's width is {width}")
    return apply_reducer(model, reducer, processor=processor)


def apply_vistog_processor(processor: Any, module: VisToG) -> Any:
    """Make ``processor`` emit ``module.num_tokens`` placeholders per image (in place); undo with
    :func:`remove_visionzip_processor`."""
    return patch_processor(processor, VisToGReducer(module))


def remove_vistog(model: torch.nn.Module) -> None:
    """Undo :func:`apply_vistog` on ``model`` exactly (raises if VisToG is not applied)."""
    handle = model.__dict__.get(HANDLE_ATTR)
    if handle is None or not isinstance(handle.reducer, VisToGReducer):
        raise ValueError("VisToG is not applied to this model")
    handle.remove()
