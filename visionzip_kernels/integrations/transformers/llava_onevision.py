"""LLaVA-OneVision (``model_type`` "llava_onevision": SigLIP tower, no CLS, received-attention
scores), images and videos.

Images: the anyres crops of LLaVA-NeXT (``llava_next.encode_crops``), laid out per crop by default
(VisionZip has no OneVision code of its own; ``layout="official"`` applies its LLaVA-NeXT layout
without the CLS block); samples with several images use the base crop only, as the model does.
OneVision's ``anyres_max`` feature pooling is not applied (the budget already bounds the count).

Videos (frames are the batch): every frame is reduced on its own, in place of the model's 2x2
bilinear pooling (which needs the full patch grid): per video frames x k rows, then one
image_newline, as the model ends a video.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..core import Reducer
from ._compat import ONEVISION_VIDEO_FEATURES_END_WITH_NEWLINE
from ._core import Family, Handle, output_class, patch_placeholder_check, register_family, run_clip_like_tower
from ._core import selection_layer
from .llava_next import LAYOUTS, crop_tokens, encode_crops, image_crops, image_rows


def multi_image_sample(batch_num_images: Any, image_idx: int) -> bool:
    """Whether image ``image_idx`` belongs to a sample with several images (OneVision's rule)."""
    seen = 0
    for n in batch_num_images or []:
        if image_idx < seen + n:
            return n != 1
        seen += n
    return False


def patch(handle: Handle, base: torch.nn.Module) -> None:
    tower, projector, config = base.vision_tower, base.multi_modal_projector, base.config
    selection_layer(tower, config.vision_feature_layer)
    layout = handle.options["layout"]

    def get_image_features(
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: Any = None,
        vision_feature_select_strategy: Optional[str] = None,
        vision_aspect_ratio: Optional[str] = None,
        batch_num_images: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ):
        """Replacement of ``LlavaOnevisionModel.get_image_features``: per image its crops' reduced
        rows and one newline (the base crop only for the images of multi-image samples)."""
        if batch_num_images is None:
            need = [True] * len(image_sizes)
        else:
            need = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        return encode_crops(handle, base, pixel_values, image_sizes, vision_feature_layer, need, kwargs, layout)

    def get_video_features(
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: Any = None,
        vision_feature_select_strategy: Optional[str] = None,
        **kwargs: Any,
    ):
        """Replacement of ``LlavaOnevisionModel.get_video_features``: (B, F, 3, H, W) frames -> (B,
        F * k + 1, C_text): every frame reduced to k rows, then the image_newline."""
        b, f = pixel_values_videos.shape[:2]
        layer_index = config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        layer = selection_layer(tower, layer_index)
        kwargs.pop("return_dict", None)
        out, selection = run_clip_like_tower(tower, pixel_values_videos.flatten(0, 1), layer, has_cls=False, **kwargs)
        reduced = handle.reducer.reduce(selection)  # one row per frame
        frames = projector(reduced.features)
        rows = frames.reshape(b, f * frames.shape[1], -1)
        if ONEVISION_VIDEO_FEATURES_END_WITH_NEWLINE:  # else the model's forward appends it
            rows = torch.cat([rows, base.image_newline[None, None].to(frames).expand(b, 1, -1)], dim=1)
        return output_class()(
            last_hidden_state=out.last_hidden_state,
            pooler_output=rows,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            kept_indices=list(reduced.kept_indices.view(b, f, -1).unbind(0)),
        )

    handle.set(base, "get_image_features", get_image_features)
    handle.set(base, "get_video_features", get_video_features)
    patch_placeholder_check(handle, base, "crops (frames) x k + 1 newline per image (video)")


def image_tokens(processor: Any, image_inputs: dict, image_idx: int, reducer: Reducer, options: dict) -> int:
    per_crop = crop_tokens(processor, image_inputs, reducer, has_cls=False)
    if multi_image_sample(image_inputs.get("batch_num_images"), image_idx):
        return per_crop + 1  # multi-image samples: base crop only
    return image_rows(image_crops(processor, image_inputs, image_idx), per_crop, options["layout"])


def video_text(processor: Any, video_inputs: dict, video_idx: int, reducer: Reducer, options: dict) -> str:
    video = video_inputs["pixel_values_videos"][video_idx]
    frames = len(video) if isinstance(video, (list, tuple)) else int(video.shape[0])
    return processor.video_token * (frames * reducer.tokens(int(processor.num_image_tokens)) + 1)


FAMILY = register_family(
    Family("llava_onevision", ("llava_onevision",), ("LlavaOnevisionProcessor",), patch, image_tokens, video_text,
           defaults=(("layout", "per_crop", LAYOUTS),))
)
