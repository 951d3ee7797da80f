"""LLaVA-1.5 (``VisionZipLlavaForConditionalGeneration``, model_type "llava", CLIP tower, CLS kept).

vLLM builds the CLIP tower up to ``vision_feature_layer``, so the selection layer is its last layer.
The tower runs on every patch; each image's selection-layer tokens (CLS included) are reduced to
``visionzip_budget`` rows, which go through the unchanged projector. The processing info reports that
count, so vLLM's own prompt replacement emits exactly that many placeholders per image.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.vision import get_num_selected_vision_tokens
from vllm.multimodal import MULTIMODAL_REGISTRY

from .base import (
    CheckedProcessor,
    ClipSelection,
    VisionZipInfo,
    check_clip_tower,
    check_engine,
    check_model_config,
    clip_tokens,
    encoder_budget,
    reducer_from_config,
    reject_embeddings,
)

ARCHITECTURE = "VisionZipLlavaForConditionalGeneration"


class VisionZipLlavaProcessingInfo(VisionZipInfo, LlavaProcessingInfo):
    """LLaVA processing info whose image token count is the reduced one."""

    architecture, model_types = ARCHITECTURE, ("llava",)

    def visionzip_check(self):
        reducer = check_model_config(self.ctx.model_config, ARCHITECTURE)
        check_clip_tower(self.ctx.model_config.hf_config, reducer, ARCHITECTURE)
        return reducer

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return self.reducer.tokens(clip_tokens(self.get_hf_config().vision_config))


def uncompressed_crop_tokens(hf_config: Any) -> int:
    """LLM tokens the unpatched model gives one crop (576 for CLIP-L/336 with the "default" strategy)."""
    return get_num_selected_vision_tokens(clip_tokens(hf_config.vision_config), hf_config.vision_feature_select_strategy)


class VisionZipLlavaMultiModalProcessor(CheckedProcessor, LlavaMultiModalProcessor):
    """vLLM's LLaVA processor, checking the engine's VisionZip settings when it is built."""


@MULTIMODAL_REGISTRY.register_processor(
    VisionZipLlavaMultiModalProcessor, info=VisionZipLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class VisionZipLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA with the image features reduced by VisionZip (``hf_overrides`` opt-in)."""

    # The tower runs on all patches but the LLM gets fewer rows: vLLM's tower-LoRA token mapping
    # (one tower token per embedding) would not hold.
    supports_tower_connector_lora = False

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        self.reducer = reducer_from_config(config, ARCHITECTURE)
        check_clip_tower(config, self.reducer, ARCHITECTURE)
        check_engine(vllm_config, ARCHITECTURE, positions=False)
        max_crops = encoder_budget(vllm_config) // uncompressed_crop_tokens(config)
        self.visionzip = ClipSelection(self.vision_tower, self.reducer, max_crops)

    def _parse_and_validate_image_input(self, **kwargs: object):
        reject_embeddings(kwargs, ARCHITECTURE)
        return super()._parse_and_validate_image_input(**kwargs)

    def _image_pixels_to_features(self, vision_tower: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, k, C_vision): the reduced selection-layer rows of each image (the CLS
        token is kept inside the budget, whatever ``vision_feature_select_strategy`` says)."""
        return self.visionzip(pixel_values).features
