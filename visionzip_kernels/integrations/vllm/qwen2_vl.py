"""Qwen2-VL and Qwen2.5-VL (``VisionZipQwen2VLForConditionalGeneration``,
``VisionZipQwen2_5_VLForConditionalGeneration``; no CLS).

Scores: the attention each patch receives at the last full-attention block (Qwen2.5-VL windows the
others), from the RoPE-rotated q / k that block's attention is called with, per image; keys: that
block's keys before RoPE. Both are averaged over each 2x2 merge unit (Qwen2.5-VL's window order
undone with the model's own ``reverse_indices``) and reduced per image on the merger output, as in
the transformers integration (``integrations.core.merged_unit_selection``).

Positions (docs/vllm.md "Qwen positions"): vLLM computes a request's M-RoPE positions when it is
admitted, before the encoder has chosen the tokens. At admission every reduced image token gets the
position of its image's first merged token (text after the image keeps the position it has without
reduction); the encoder appends to each kept row the (t, h, w) grid coordinate of the token it stands
for (``base.attach_positions``); ``embed_input_ids`` strips those channels and ``forward`` adds them to
the positions of the image tokens of the batch. Each kept token thus gets the position of the token it
stands for, as in the transformers integration. Videos are not reduced.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.utils import copy_mm_embedding_modality

from ..core import Capture, Reduction, Selection, expand_runs, merged_unit_selection
from .base import (
    CheckedProcessor,
    VisionZipInfo,
    attach_positions,
    check_position_engine,
    check_model_config,
    combine_heads,
    config_error,
    detach_positions,
    encoder_budget,
    full_attention_block,
    grid_coordinates,
    micro_batches,
    reducer_from_config,
)

QWEN2_VL = "VisionZipQwen2VLForConditionalGeneration"
QWEN2_5_VL = "VisionZipQwen2_5_VLForConditionalGeneration"


def check_qwen_config(model_config: Any, architecture: str):
    """Front-end checks: settings, no embeddings, the tower in tensor-parallel mode (its
    data-parallel path bypasses the model's image processing), no EVS video pruning (it uses the same
    embedding channels), a full-attention block to score."""
    reducer = check_model_config(model_config, architecture)
    mm_config = model_config.multimodal_config
    if mm_config is not None and mm_config.mm_encoder_tp_mode == "data":
        raise config_error(architecture, "mm_encoder_tp_mode='data' is not supported; use the default 'weights'.")
    if mm_config is not None and (mm_config.video_pruning_rate or 0) > 0:
        raise config_error(architecture, "video_pruning_rate (EVS) cannot be combined with VisionZip.")
    full = getattr(model_config.hf_config.vision_config, "fullatt_block_indexes", None)
    if full is not None and len(full) == 0:
        raise config_error(architecture, "the vision tower has no full-attention block to score tokens at.")
    return reducer


class _ReducedImageInfo(VisionZipInfo):
    """Processing info whose image token count is the reduced one (max tokens, encoder budget)."""

    def visionzip_check(self):
        return check_qwen_config(self.ctx.model_config, self.architecture)  # type: ignore[attr-defined]

    def get_num_image_tokens(self, *, image_width: int, image_height: int, image_processor: Any,
                             mm_kwargs: Any) -> int:
        full = super().get_num_image_tokens(  # type: ignore[misc]
            image_width=image_width, image_height=image_height, image_processor=image_processor, mm_kwargs=mm_kwargs
        )
        return self.reducer.tokens(full)


class _ReducedImageProcessor(CheckedProcessor):
    """Multimodal processor (checking the settings when built) whose image placeholders are the
    reduced count of the image's merged tokens (vLLM counts them from ``image_grid_thw`` here, not
    from the processing info)."""

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Any, out_mm_kwargs: Any) -> list:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)  # type: ignore[misc]
        info = self.info  # type: ignore[attr-defined]
        config = info.get_hf_config()
        merge = config.vision_config.spatial_merge_size

        def replacement(item_idx: int) -> list[int]:
            grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data
            return [config.image_token_id] * info.reducer.tokens(int(grid.prod()) // merge**2)

        return [
            PromptReplacement(modality="image", target=u.target, replacement=replacement)
            if u.modality == "image" else u
            for u in updates
        ]


class _VisionZipQwen:
    """The VisionZip part of both Qwen model classes (mixed in before vLLM's class)."""

    architecture: str
    supports_tower_connector_lora = False  # tower tokens != embeddings, see base.ClipVisionZipModel

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        config = vllm_config.model_config.hf_config
        self.reducer = reducer_from_config(config, self.architecture)
        check_position_engine(vllm_config, self.architecture)
        if vllm_config.compilation_config.compile_mm_encoder:
            raise config_error(self.architecture, "compile_mm_encoder is not supported (scores are read by hooks).")
        self.visionzip_block = full_attention_block(self.visual)
        self.visionzip_budget_tokens = encoder_budget(vllm_config)
        self.visionzip_width = vllm_config.model_config.get_inputs_embeds_size()
        self._visionzip_offsets: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    # ---------------------------------------------------------------- encoder

    def _visionzip_encode(self, pixel_values: torch.Tensor, grids: list[list[int]]) -> list[Reduction]:
        """One tower call on the packed patches of ``grids``' images; per image its reduction."""
        visual = self.visual
        unit = visual.spatial_merge_size**2
        metadata = visual.prepare_encoder_metadata(grids)
        attn = visual.blocks[self.visionzip_block].attn
        with Capture() as cap:
            cap.inputs(attn.apply_rotary_emb, "rope")  # (q ++ k) before RoPE
            cap.inputs(attn.attn, "attn")  # the q, k the block attends with
            merged = visual(pixel_values, grid_thw=grids, encoder_metadata=metadata)
        qk = cap["rope"][0][0]
        _, attn_kwargs = cap["attn"]
        frames = [h * w for t, h, w in grids for _ in range(t)]
        cu_seqlens = torch.tensor([0] + frames, device=qk.device).cumsum(0)
        scores, keys = merged_unit_selection(
            attn_kwargs["query"][0], attn_kwargs["key"][0], qk[1], attn.hidden_size_per_attention_head**-0.5,
            cu_seqlens, unit, metadata.get("reverse_indices"),
        )
        scores, keys = combine_heads(scores, keys, attn.tp_size)
        sizes = [t * h * w // unit for t, h, w in grids]
        return [
            self.reducer.reduce(Selection(rows[None], s[None], k[None], has_cls=False))
            for rows, s, k in zip(merged.split(sizes), scores.split(sizes), keys.split(sizes))
        ]

    def _process_image_input(self, image_input: Any) -> tuple[torch.Tensor, ...]:
        """Per image: its reduced rows (k, C) with the grid coordinates of the tokens they stand for
        appended as 6 channels (stripped again in ``embed_input_ids``)."""
        if image_input["type"] != "pixel_values":
            raise config_error(self.architecture, "image embeddings as inputs bypass the vision tower; pass images.")
        grids = image_input["image_grid_thw"].tolist()
        pixel_values = image_input["pixel_values"]
        merge = self.visual.spatial_merge_size
        patches = [t * h * w for t, h, w in grids]
        starts = torch.tensor([0] + patches).cumsum(0).tolist()
        out: list[torch.Tensor] = []
        for lo, hi in micro_batches([p // merge**2 for p in patches], self.visionzip_budget_tokens):
            reductions = self._visionzip_encode(pixel_values[starts[lo] : starts[hi]], grids[lo:hi])
            for reduction, (t, h, w) in zip(reductions, grids[lo:hi]):
                coords = grid_coordinates(reduction.kept_indices[0], (t, h // merge, w // merge))
                out.append(attach_positions(reduction.features[0], coords))
        return tuple(out)

    def get_encoder_cudagraph_config(self) -> Any:
        """Encoder CUDA graphs bypass ``_process_image_input``: images never take that path."""
        config = super().get_encoder_cudagraph_config()  # type: ignore[misc]
        return dataclasses.replace(config, modalities=[m for m in config.modalities if m != "image"])

    # ---------------------------------------------------------------- positions

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        """Positions at admission: vLLM's own on the prompt with every image run expanded back to its
        merged tokens, then each reduced image token at its image's first merged token (``forward``
        adds the kept token's grid coordinate). Text and videos keep the positions they have without
        reduction; the delta follows."""
        merge = self.config.vision_config.spatial_merge_size
        runs, full, features, shift = [], [], [], 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            place = feature.mm_position
            length = place.length
            if feature.modality == "image":
                length = int(feature.data["image_grid_thw"].data.prod()) // merge**2
                runs.append((place.offset, place.offset + place.length))
                full.append(length)
            features.append(dataclasses.replace(
                feature, mm_position=dataclasses.replace(place, offset=place.offset + shift, length=length)))
            shift += length - place.length
        expanded_tokens = [0] * (len(input_tokens) + shift)  # only their number matters
        expanded, _ = super().get_mrope_input_positions(expanded_tokens, features)  # type: ignore[misc]
        first = [torch.zeros(end - start, dtype=torch.int64) for start, end in runs]
        positions = expanded[:, expand_runs(len(input_tokens), runs, full, first)]
        return positions, int(positions.max()) + 1 - len(input_tokens)

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: Any = None, *,
                        is_multimodal: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Strip the position channels of the image rows and keep their offsets for ``forward``."""
        self._visionzip_offsets = None
        if multimodal_embeddings is None or is_multimodal is None or len(multimodal_embeddings) == 0:
            return super().embed_input_ids(  # type: ignore[misc]
                input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        rows, offsets = [], []
        for embedding in multimodal_embeddings:
            r, o = detach_positions(embedding, self.visionzip_width)
            rows.append(copy_mm_embedding_modality(embedding, r))
            offsets.append(o)
        self._visionzip_offsets = (is_multimodal, torch.cat(offsets, dim=1))
        return super().embed_input_ids(input_ids, rows, is_multimodal=is_multimodal)  # type: ignore[misc]

    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor, intermediate_tensors: Any = None,
                inputs_embeds: Optional[torch.Tensor] = None, **kwargs: object) -> Any:
        """Add the kept tokens' grid coordinates to the positions of this batch's image tokens (in
        place: the runner refills its position buffer every step), then vLLM's forward."""
        offsets, self._visionzip_offsets = self._visionzip_offsets, None
        if offsets is not None and positions.dim() == 2 and offsets[0].numel() <= positions.shape[1]:
            mask, delta = offsets
            index = mask.to(positions.device).nonzero().squeeze(1)
            positions[:, index] += delta.to(positions)
        return super().forward(  # type: ignore[misc]
            input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)


class VisionZipQwen2VLProcessingInfo(_ReducedImageInfo, Qwen2VLProcessingInfo):
    architecture, model_types = QWEN2_VL, ("qwen2_vl",)


class VisionZipQwen2VLMultiModalProcessor(_ReducedImageProcessor, Qwen2VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    VisionZipQwen2VLMultiModalProcessor, info=VisionZipQwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class VisionZipQwen2VLForConditionalGeneration(_VisionZipQwen, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with image tokens reduced by VisionZip (``hf_overrides`` opt-in)."""

    architecture = QWEN2_VL


class VisionZipQwen2_5_VLProcessingInfo(_ReducedImageInfo, Qwen2_5_VLProcessingInfo):
    architecture, model_types = QWEN2_5_VL, ("qwen2_5_vl",)


class VisionZipQwen2_5_VLMultiModalProcessor(_ReducedImageProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    VisionZipQwen2_5_VLMultiModalProcessor, info=VisionZipQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class VisionZipQwen2_5_VLForConditionalGeneration(_VisionZipQwen, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with image tokens reduced by VisionZip (``hf_overrides`` opt-in)."""

    architecture = QWEN2_5_VL
