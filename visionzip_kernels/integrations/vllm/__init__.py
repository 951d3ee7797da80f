"""VisionZip for vLLM: a ``vllm.general_plugins`` plugin (entry point ``visionzip`` in pyproject.toml).

Installed next to vLLM, the plugin registers one VisionZip architecture per supported model; an
engine opts in through ``hf_overrides`` (nothing changes for engines that do not)::

    from vllm import LLM
    llm = LLM("llava-hf/llava-1.5-7b-hf", hf_overrides={
        "architectures": ["VisionZipLlavaForConditionalGeneration"], "visionzip_budget": 64})

    vllm serve llava-hf/llava-1.5-7b-hf --hf-overrides \\
        '{"architectures": ["VisionZipLlavaForConditionalGeneration"], "visionzip_budget": 64}'

:data:`ARCHITECTURES` maps each stock architecture to its VisionZip one; :func:`hf_overrides` builds
the dict. Design and the vLLM internals relied on: docs/vllm.md.
"""

from __future__ import annotations

from typing import Optional

#: Stock vLLM architecture -> (VisionZip architecture, "module:Class" registered for it).
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlavaForConditionalGeneration": (
        "VisionZipLlavaForConditionalGeneration",
        f"{__name__}.llava:VisionZipLlavaForConditionalGeneration",
    ),
    "LlavaNextForConditionalGeneration": (
        "VisionZipLlavaNextForConditionalGeneration",
        f"{__name__}.llava_next:VisionZipLlavaNextForConditionalGeneration",
    ),
    "Qwen2VLForConditionalGeneration": (
        "VisionZipQwen2VLForConditionalGeneration",
        f"{__name__}.qwen2_vl:VisionZipQwen2VLForConditionalGeneration",
    ),
    "Qwen2_5_VLForConditionalGeneration": (
        "VisionZipQwen2_5_VLForConditionalGeneration",
        f"{__name__}.qwen2_vl:VisionZipQwen2_5_VLForConditionalGeneration",
    ),
}

#: vLLM versions this plugin is tested with (docs/vllm.md pins the internals it relies on).
TESTED_VLLM = ">=0.32,<0.33"

__all__ = ["ARCHITECTURES", "TESTED_VLLM", "hf_overrides", "register"]


def register() -> None:
    """Register the VisionZip architectures with vLLM (the ``vllm.general_plugins`` entry point).

    vLLM calls it in every process it starts (front end, engine core, each worker, the model-inspection
    subprocess); registering again only overwrites the same entries. The ``"module:Class"`` form is
    lazy: the model modules (and vLLM's model code they import) load only where vLLM builds a
    VisionZip model or its processor.
    """
    from vllm import ModelRegistry

    for architecture, target in ARCHITECTURES.values():
        ModelRegistry.register_model(architecture, target)


def hf_overrides(
    architecture: str, budget: int, contextual: Optional[int] = None, layout: Optional[str] = None
) -> dict:
    """The ``hf_overrides`` that switch an engine of a stock ``architecture`` (e.g.
    "LlavaForConditionalGeneration", the checkpoint's ``config.json`` ``architectures[0]``) to VisionZip
    with ``budget`` tokens per image (per crop for LLaVA-NeXT), ``contextual`` of them merged (default
    budget * 5 // 32), and for LLaVA-NeXT the ``layout`` of the crops ("official" or "per_crop")."""
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"VisionZip: no VisionZip architecture for {architecture!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    overrides: dict = {"architectures": [ARCHITECTURES[architecture][0]], "visionzip_budget": budget}
    if contextual is not None:
        overrides["visionzip_contextual"] = contextual
    if layout is not None:
        overrides["visionzip_layout"] = layout
    return overrides
