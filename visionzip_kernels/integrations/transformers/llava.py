"""LLaVA-1.5 (``model_type`` "llava": CLIP tower, CLS kept): the projector receives the reduced rows
of the selection layer (``vision_feature_layer``) instead of its 576 patches."""

from __future__ import annotations

import sys
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

def clip_tokens(image_size: int, patch_size: Optional[int], has_cls: bool = True) -> int:
    """Tokens a CLIP / SigLIP tower produces per image (crop): the patches, and the CLS token.
    Unknown patch size: as many as any budget (the reducer keeps its full budget)."""
    if not patch_size:
        return sys.maxsize
    return (image_size // patch_size) ** 2 + int(has_cls)


def patch(handle: Handle, base: torch.nn.Module) -> None:
    tower, projector, config = base.vision_tower, base.multi_modal_projector, base.config
    selection_layer(tower, config.vision_feature_layer)  # fail at apply time on unsupported configs
    output_cls = output_class()

    def get_image_features(
        pixel_values: torch.Tensor,
        vision_feature_layer: Any = None,
        vision_feature_select_strategy: Optional[str] = None,
        image_sizes: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ):
        """Replacement of ``LlavaModel.get_image_features``: (B, 3, H, W) pixels -> per image
        (tokens, C_text) features. The CLS token is kept (inside the dominant budget) whatever
        ``vision_feature_select_strategy`` says, as in the method."""
        if image_sizes is not None:
            raise NotImplementedError("VisionZip: LLaVA with image_sizes (Pixtral-style towers) is not supported")
        layer_index = config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        layer = selection_layer(tower, layer_index)
        kwargs.pop("return_dict", None)
        out, selection = run_clip_like_tower(tower, pixel_values, layer, has_cls=True, **kwargs)
        reduced = handle.reducer.reduce(selection)
        features = projector(reduced.features)
        return output_cls(
            last_hidden_state=out.last_hidden_state,
            pooler_output=list(features),
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            kept_indices=list(reduced.kept_indices.unbind(0)),
            **per_image_fields(reduced.details),
        )

    handle.set(base, "get_image_features", get_image_features)
    vision = config.vision_config
    patch_placeholder_check(handle, base, f"{handle.reducer.tokens(clip_tokens(vision.image_size, vision.patch_size))} per image")


def image_tokens(processor: Any, image_inputs: dict, image_idx: int, reducer: Reducer, options: dict) -> int:
    """Placeholders per image: the reduced count of the tower's tokens."""
    size = int(image_inputs["pixel_values"].shape[-1])
    return reducer.tokens(clip_tokens(size, getattr(processor, "patch_size", None)))


FAMILY = register_family(Family("llava", ("llava",), ("LlavaProcessor",), patch, image_tokens))
