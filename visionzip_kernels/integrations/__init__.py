"""Integrations of VisionZip (and VisToG, docs/vistog.md) into model libraries.

``visionzip_kernels.integrations.transformers`` patches loaded Hugging Face ``transformers``
vision-language models (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL) so that the
language model receives ``budget`` visual tokens per image (per crop) instead of all of them.
It is imported lazily: ``import visionzip_kernels`` never imports ``transformers``. What the
integrations share (scores from q / k, the reducers that stand for a method) is ``core``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "VisionZipHandle",
    "apply_visionzip",
    "apply_visionzip_processor",
    "apply_vistog",
    "remove_visionzip",
    "remove_visionzip_processor",
    "remove_vistog",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import transformers as _hf

        return getattr(_hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
