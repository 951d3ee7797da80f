"""LLaVA-NeXT (``VisionZipLlavaNextForConditionalGeneration``, model_type "llava_next", CLIP crops).

Every crop (the base image, then the sub-crops in processor order, row-major over the crop grid) is
reduced on its own to ``visionzip_budget`` rows (CLS kept), the tower run on every patch of every
crop. The rows are laid out as ``visionzip_layout`` says, as in the transformers integration
(``integrations.core.anyres_order``): "official" (default, VisionZip's own layout: (1 + P) k rows, no
image_newline) or "per_crop" ([crop 0: k]...[crop P: k][image_newline]). The processing info reports
that count, so vLLM's prompt replacement and budgets use it.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
    get_anyres_image_grid_shape,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..core import ANYRES_LAYOUTS, anyres_order, anyres_rows
from .base import CheckedProcessor, ClipVisionZipModel, VisionZipInfo, check_clip_model, clip_tokens, config_error

ARCHITECTURE = "VisionZipLlavaNextForConditionalGeneration"
LAYOUT_KEY = "visionzip_layout"


def layout_from_config(hf_config: Any) -> str:
    """``visionzip_layout`` from the hf_config after ``hf_overrides`` (default "official")."""
    layout = getattr(hf_config, LAYOUT_KEY, None) or "official"
    if layout not in ANYRES_LAYOUTS:
        raise config_error(ARCHITECTURE, f"'{LAYOUT_KEY}' must be one of {', '.join(ANYRES_LAYOUTS)}; got {layout!r}.")
    return layout


def crop_grid(hf_config: Any, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of the sub-crop grid of an image of height x width."""
    rows, cols = get_anyres_image_grid_shape((height, width), hf_config.image_grid_pinpoints,
                                             hf_config.vision_config.image_size)
    return int(rows), int(cols)


class VisionZipLlavaNextProcessingInfo(VisionZipInfo, LlavaNextProcessingInfo):
    """LLaVA-NeXT processing info whose image token count is the reduced layout's."""

    architecture, model_types = ARCHITECTURE, ("llava_next",)

    def visionzip_check(self):
        reducer = check_clip_model(self.ctx.model_config, ARCHITECTURE)
        layout_from_config(self.ctx.model_config.hf_config)
        return reducer

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        config = self.get_hf_config()
        rows, cols = crop_grid(config, image_height, image_width)
        k = self.reducer.tokens(clip_tokens(config.vision_config))
        return anyres_rows(1 + rows * cols, k, layout_from_config(config))


class VisionZipLlavaNextMultiModalProcessor(CheckedProcessor, LlavaNextMultiModalProcessor):
    """vLLM's LLaVA-NeXT processor, checking the engine's VisionZip settings when it is built."""


@MULTIMODAL_REGISTRY.register_processor(
    VisionZipLlavaNextMultiModalProcessor, info=VisionZipLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class VisionZipLlavaNextForConditionalGeneration(ClipVisionZipModel, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with each crop reduced by VisionZip (``hf_overrides`` opt-in)."""

    architecture = ARCHITECTURE

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.visionzip_layout = layout_from_config(vllm_config.model_config.hf_config)

    def _process_image_input(self, image_input: Any) -> list[torch.Tensor]:
        """Per image: its crops reduced (batch padding crops dropped), projected, laid out."""
        config, vision = self.config, self.config.vision_config
        sizes = [tuple(int(v) for v in size) for size in image_input["image_sizes"]]
        grids = [crop_grid(config, h, w) for h, w in sizes]
        crops = [1 + rows * cols for rows, cols in grids]
        pixels = torch.cat([pix[:n] for pix, n in zip(image_input["pixel_values"], crops)])
        reduced = self.visionzip(pixels)
        projected = self.multi_modal_projector(reduced.features)  # (all crops, k, C)
        k = projected.shape[1]
        newline = self.image_newline[None].to(projected)
        dominant = reduced.details.dominant_indices if reduced.details is not None else None
        out, start = [], 0
        for n, grid in zip(crops, grids):
            rows = torch.cat([projected[start : start + n].flatten(0, 1), newline])
            order = anyres_order(self.visionzip_layout, n, k, None if dominant is None else dominant[start : start + n],
                                 grid, vision.image_size // vision.patch_size, device=rows.device)
            out.append(rows[order])
            start += n
        return out
