"""LLaVA-NeXT (``model_type`` "llava_next": CLIP tower, anyres crops, CLS kept).

Every crop (the base image first, then the sub-crops in processor order) is reduced on its own with
the same per-crop budget, in one call with one row per crop. An image becomes
[crop 0: k rows][crop 1: k rows]...[crop P-1: k rows][image_newline]: the unpad / per-row newline
layout of the original needs a full patch grid, which reduced tokens no longer form; the single
trailing newline keeps the end-of-image marker the model was trained with.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..core import Reducer
from ._core import (
    Family,
    Handle,
    output_class,
    patch_placeholder_check,
    per_image_fields,
    register_family,
    run_clip_like_tower,
    selection_layer,
)
from .llava import clip_tokens


def num_crops(image_size: Any, grid_pinpoints: list, crop_size: int) -> int:
    """Crops (base + sub-crops) the model sees for an image of ``image_size`` (height, width)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    size = image_size.tolist() if hasattr(image_size, "tolist") else list(image_size)
    return int(image_size_to_num_patches(image_size=size, grid_pinpoints=grid_pinpoints, patch_size=crop_size))


def has_cls_token(tower: torch.nn.Module) -> bool:
    """CLIP towers (LLaVA-NeXT) have a CLS token; SigLIP (OneVision) does not."""
    return getattr(tower.embeddings, "class_embedding", None) is not None


def encode_crops(
    handle: Handle, base: torch.nn.Module, pixel_values: torch.Tensor, image_sizes: Any, vision_feature_layer: Any,
    need_crops: list[bool], kwargs: dict,
):
    """The anyres ``get_image_features`` of LLaVA-NeXT and OneVision: per image, its crops reduced
    (only the base crop where ``need_crops`` is False), then one image_newline."""
    tower, projector, config = base.vision_tower, base.multi_modal_projector, base.config
    crops = [
        num_crops(size, config.image_grid_pinpoints, config.vision_config.image_size) if crop else 1
        for size, crop in zip(image_sizes, need_crops)
    ]
    if pixel_values.dim() == 5:
        pixel_values = torch.cat([pix[:n] for pix, n in zip(pixel_values, crops)], dim=0)
    elif pixel_values.dim() != 4:
        raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected 4 or 5 dimensions")
    layer = selection_layer(tower, config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer)
    kwargs.pop("return_dict", None)
    out, selection = run_clip_like_tower(tower, pixel_values, layer, has_cls=has_cls_token(tower), **kwargs)
    reduced = handle.reducer.reduce(selection)  # one row per crop
    projected = projector(reduced.features)
    newline = base.image_newline[None].to(projected)
    features, split = [], 0
    for n in crops:
        features.append(torch.cat([projected[split : split + n].flatten(0, 1), newline], dim=0))
        split += n
    return output_class()(
        last_hidden_state=out.last_hidden_state,
        pooler_output=features,
        hidden_states=out.hidden_states,
        attentions=out.attentions,
        kept_indices=list(reduced.kept_indices.split(crops)),
        **per_image_fields(reduced.details, crops),
    )


def crop_tokens(processor: Any, image_inputs: dict, reducer: Reducer, has_cls: bool) -> int:
    """Reduced rows of one crop: from the processor's crop and patch sizes, or its per-crop token
    count (OneVision's ``num_image_tokens``)."""
    crop = int(image_inputs["pixel_values"][0][0].shape[-1])
    patch = getattr(processor, "patch_size", None) or getattr(processor.image_processor, "patch_size", None)
    if not patch and getattr(processor, "num_image_tokens", None):
        return reducer.tokens(int(processor.num_image_tokens))
    return reducer.tokens(clip_tokens(crop, patch, has_cls))


def patch(handle: Handle, base: torch.nn.Module) -> None:
    selection_layer(base.vision_tower, base.config.vision_feature_layer)

    def get_image_features(
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: Any = None,
        vision_feature_select_strategy: Optional[str] = None,
        **kwargs: Any,
    ):
        """Replacement of ``LlavaNextModel.get_image_features``: per image crops * k + 1 rows."""
        return encode_crops(handle, base, pixel_values, image_sizes, vision_feature_layer,
                            [True] * len(image_sizes), kwargs)

    handle.set(base, "get_image_features", get_image_features)
    patch_placeholder_check(handle, base, "crops x k + 1 newline per image")


def image_tokens(processor: Any, image_inputs: dict, image_idx: int, reducer: Reducer) -> int:
    crop = int(image_inputs["pixel_values"][0][0].shape[-1])
    crops = num_crops(image_inputs["image_sizes"][image_idx], processor.image_processor.image_grid_pinpoints, crop)
    return crops * crop_tokens(processor, image_inputs, reducer, has_cls=True) + 1


FAMILY = register_family(Family("llava_next", ("llava_next",), ("LlavaNextProcessor",), patch, image_tokens))
