"""LLaVA-1.5 (``VisionZipLlavaForConditionalGeneration``, model_type "llava", CLIP tower, CLS kept).

vLLM builds the CLIP tower up to ``vision_feature_layer``, so the selection layer is its last layer.
The tower runs on every patch; each image's selection-layer tokens (CLS included) are reduced to
``visionzip_budget`` rows, which go through the unchanged projector. The processing info reports that
count, so vLLM's own prompt replacement emits exactly that many placeholders per image.
"""

from __future__ import annotations


import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .base import CheckedProcessor, ClipVisionZipModel, VisionZipInfo, check_clip_model, clip_tokens

ARCHITECTURE = "VisionZipLlavaForConditionalGeneration"


class VisionZipLlavaProcessingInfo(VisionZipInfo, LlavaProcessingInfo):
    """LLaVA processing info whose image token count is the reduced one."""

    architecture, model_types = ARCHITECTURE, ("llava",)

    def visionzip_check(self):
        return check_clip_model(self.ctx.model_config, ARCHITECTURE)

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return self.reducer.tokens(clip_tokens(self.get_hf_config().vision_config))


class VisionZipLlavaMultiModalProcessor(CheckedProcessor, LlavaMultiModalProcessor):
    """vLLM's LLaVA processor, checking the engine's VisionZip settings when it is built."""


@MULTIMODAL_REGISTRY.register_processor(
    VisionZipLlavaMultiModalProcessor, info=VisionZipLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class VisionZipLlavaForConditionalGeneration(ClipVisionZipModel, LlavaForConditionalGeneration):
    """vLLM's LLaVA with the image features reduced by VisionZip (``hf_overrides`` opt-in)."""

    architecture = ARCHITECTURE

    def _image_pixels_to_features(self, vision_tower: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, k, C_vision): the reduced selection-layer rows of each image (the CLS
        token is kept inside the budget, whatever ``vision_feature_select_strategy`` says)."""
        return self.visionzip(pixel_values).features
