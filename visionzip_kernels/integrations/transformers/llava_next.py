"""LLaVA-NeXT (``model_type`` "llava_next": CLIP tower, anyres crops, CLS kept).

Every crop (the base image first, then the sub-crops in processor order, row-major over the crop
grid) is reduced on its own with the same per-crop budget, in one call with one row per crop. The
rows are then laid out as the option ``layout`` says:

* ``"official"`` (default): VisionZip's own layout, the one the paper's LLaVA-NeXT accuracy was
  measured with (``visionzip/llava_arch.py``: ``prepare_inputs_labels_for_multimodal_visionzip`` /
  ``restore_image_features_sorted``; ``core.official_anyres_order``): the base crop's k rows; the
  sub-crops' non-CLS dominant rows on the full patch grid in raster order; the sub-crops' CLS rows;
  the sub-crops' contextual rows. No image_newline, no unpadding: (1 + P) k rows.
* ``"per_crop"``: [crop 0: k rows][crop 1: k rows]...[crop P: k rows][image_newline], (1 + P) k + 1.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..core import ANYRES_LAYOUTS, Reducer, anyres_order
from ..core import anyres_rows as image_rows
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

LAYOUTS = ANYRES_LAYOUTS


def num_crops(image_size: Any, grid_pinpoints: list, crop_size: int) -> int:
    """Crops (base + sub-crops) the model sees for an image of ``image_size`` (height, width)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    size = image_size.tolist() if hasattr(image_size, "tolist") else list(image_size)
    return int(image_size_to_num_patches(image_size=size, grid_pinpoints=grid_pinpoints, patch_size=crop_size))


def crop_grid(image_size: Any, grid_pinpoints: list, crop_size: int) -> tuple[int, int]:
    """(rows, cols) of the sub-crop grid of an image of ``image_size`` (height, width)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    size = image_size.tolist() if hasattr(image_size, "tolist") else list(image_size)
    rows, cols = get_anyres_image_grid_shape(size, grid_pinpoints, crop_size)
    return int(rows), int(cols)


def has_cls_token(tower: torch.nn.Module) -> bool:
    """CLIP towers (LLaVA-NeXT) have a CLS token; SigLIP (OneVision) does not."""
    return getattr(tower.embeddings, "class_embedding", None) is not None


def encode_crops(
    handle: Handle, base: torch.nn.Module, pixel_values: torch.Tensor, image_sizes: Any, vision_feature_layer: Any,
    need_crops: list[bool], kwargs: dict, layout: str,
):
    """The anyres ``get_image_features`` of LLaVA-NeXT and OneVision: per image its crops reduced
    (only the base crop where ``need_crops`` is False), laid out by ``layout``."""
    tower, projector, config = base.vision_tower, base.multi_modal_projector, base.config
    vision = config.vision_config
    crops = [
        num_crops(size, config.image_grid_pinpoints, vision.image_size) if crop else 1
        for size, crop in zip(image_sizes, need_crops)
    ]
    if pixel_values.dim() == 5:
        pixel_values = torch.cat([pix[:n] for pix, n in zip(pixel_values, crops)], dim=0)
    elif pixel_values.dim() != 4:
        raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected 4 or 5 dimensions")
    layer = selection_layer(tower, config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer)
    kwargs.pop("return_dict", None)
    has_cls = has_cls_token(tower)
    out, selection = run_clip_like_tower(tower, pixel_values, layer, has_cls=has_cls, **kwargs)
    reduced = handle.reducer.reduce(selection)  # one row per crop
    projected = projector(reduced.features)
    k = projected.shape[1]
    newline = base.image_newline[None].to(projected)
    features, orders, split = [], [], 0
    for size, n in zip(image_sizes, crops):
        rows = torch.cat([projected[split : split + n].flatten(0, 1), newline])  # row n * k: the newline
        dominant = reduced.details.dominant_indices[split : split + n] if reduced.details is not None else None
        order = anyres_order(layout, n, k, dominant, crop_grid(size, config.image_grid_pinpoints, vision.image_size),
                             vision.image_size // vision.patch_size, has_cls=has_cls, device=rows.device)
        features.append(rows[order])
        orders.append(order)
        split += n
    return output_class()(
        last_hidden_state=out.last_hidden_state,
        pooler_output=features,
        hidden_states=out.hidden_states,
        attentions=out.attentions,
        kept_indices=list(reduced.kept_indices.split(crops)),
        row_order=orders,
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


def image_crops(processor: Any, image_inputs: dict, image_idx: int) -> int:
    crop = int(image_inputs["pixel_values"][0][0].shape[-1])
    return num_crops(image_inputs["image_sizes"][image_idx], processor.image_processor.image_grid_pinpoints, crop)


def patch(handle: Handle, base: torch.nn.Module) -> None:
    selection_layer(base.vision_tower, base.config.vision_feature_layer)
    layout = handle.options["layout"]

    def get_image_features(
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: Any = None,
        vision_feature_select_strategy: Optional[str] = None,
        **kwargs: Any,
    ):
        """Replacement of ``LlavaNextModel.get_image_features``: per image (1 + P) k rows (official
        layout) or (1 + P) k + 1 (per crop)."""
        return encode_crops(handle, base, pixel_values, image_sizes, vision_feature_layer,
                            [True] * len(image_sizes), kwargs, layout)

    handle.set(base, "get_image_features", get_image_features)
    patch_placeholder_check(handle, base, f"{layout} layout of (1 + P) crops x k rows per image")


def image_tokens(processor: Any, image_inputs: dict, image_idx: int, reducer: Reducer, options: dict) -> int:
    return image_rows(image_crops(processor, image_inputs, image_idx),
                      crop_tokens(processor, image_inputs, reducer, has_cls=True), options["layout"])


FAMILY = register_family(
    Family("llava_next", ("llava_next",), ("LlavaNextProcessor",), patch, image_tokens,
           defaults=(("layout", "official", LAYOUTS),))
)
