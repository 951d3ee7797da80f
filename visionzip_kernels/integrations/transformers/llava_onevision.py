"""LLaVA-OneVision (``model_type`` "llava_onevision": SigLIP tower, no CLS, received-attention
scores): the anyres layout of LLaVA-NeXT (``llava_next.encode_crops``); samples with several images
use the base crop only, as the model does. OneVision's ``anyres_max`` feature pooling is not applied
(the budget already bounds the count)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..core import Reducer
from ._core import Family, Handle, patch_placeholder_check, register_family, selection_layer
from .llava_next import crop_tokens, encode_crops, num_crops


def multi_image_sample(batch_num_images: Any, image_idx: int) -> bool:
    """Whether image ``image_idx`` belongs to a sample with several images (OneVision's rule)."""
    seen = 0
    for n in batch_num_images or []:
        if image_idx < seen + n:
            return n != 1
        seen += n
    return False


def patch(handle: Handle, base: torch.nn.Module) -> None:
    selection_layer(base.vision_tower, base.config.vision_feature_layer)

    def get_image_features(
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: Any = None,
        vision_feature_select_strategy: Optional[str] = None,
        vision_aspect_ratio: Optional[str] = None,
        batch_num_images: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ):
        """Replacement of ``LlavaOnevisionModel.get_image_features``: per image crops * k + 1 rows
        (k + 1 for the images of multi-image samples)."""
        if batch_num_images is None:
            need = [True] * len(image_sizes)
        else:
            need = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        return encode_crops(handle, base, pixel_values, image_sizes, vision_feature_layer, need, kwargs)

    handle.set(base, "get_image_features", get_image_features)
    patch_placeholder_check(handle, base, "crops x k + 1 newline per image")


def image_tokens(processor: Any, image_inputs: dict, image_idx: int, reducer: Reducer) -> int:
    per_crop = crop_tokens(processor, image_inputs, reducer, has_cls=False)
    if multi_image_sample(image_inputs.get("batch_num_images"), image_idx):
        return per_crop + 1  # multi-image samples: base crop only
    crop = int(image_inputs["pixel_values"][0][0].shape[-1])
    crops = num_crops(image_inputs["image_sizes"][image_idx], processor.image_processor.image_grid_pinpoints, crop)
    return crops * per_crop + 1


FAMILY = register_family(
    Family("llava_onevision", ("llava_onevision",), ("LlavaOnevisionProcessor",), patch, image_tokens)
)
