"""Qwen3-VL (``model_type`` "qwen3_vl"; no CLS, no windowed blocks), images and videos: as Qwen2.5-VL
(``qwen2_vl.patch``: scores at the last block, 2x2 merge units, one reduction per image and per
temporal group, M-RoPE positions of the kept tokens), and the deepstack features, which the tower
adds to the LLM's first layers at the visual positions, reduced with the same choices as the main
features (``Reducer.replay``). The processor writes one placeholder run per temporal group between
frame timestamps; each run is shortened to its reduced count. Needs transformers >= 5.18."""

from __future__ import annotations

import torch

from ._core import Family, Handle, register_family
from .qwen2_vl import image_tokens, patch as patch_qwen, video_text


def patch(handle: Handle, base: torch.nn.Module) -> None:
    patch_qwen(handle, base, deepstack=True)


FAMILY = register_family(
    Family("qwen3_vl", ("qwen3_vl",), ("Qwen3VLProcessor",), patch, image_tokens, video_text)
)
