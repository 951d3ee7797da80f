"""Misconfigurations fail when the engine starts (in the front end, when vLLM builds the multimodal
processor, before the engine core process exists), with a ValueError that names the setting and the
expected form (a TypeError for a checkpoint of another model type); plus the checks that need the
worker's whole configuration, on the function itself."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest

from tests.vllm.conftest import start_engine
from visionzip_kernels.integrations.vllm import hf_overrides
from visionzip_kernels.integrations.vllm.base import check_position_engine, micro_batches, reject_embeddings

LLAVA = "VisionZipLlavaForConditionalGeneration"


def fails(path: str, match: str, error: type = ValueError, **kwargs) -> None:
    with pytest.raises(error, match=match):
        start_engine(path, **kwargs)


@pytest.mark.parametrize("overrides,match", [
    ({"architectures": [LLAVA]}, r"must set 'visionzip_budget'"),
    ({"architectures": [LLAVA], "visionzip_budget": 38},
     r"'visionzip_budget'=38 is larger than the 37 tokens of a crop"),
    ({"architectures": [LLAVA], "visionzip_budget": "64"}, r"'visionzip_budget' must be an int; got '64'"),
    ({"architectures": [LLAVA], "visionzip_budget": 8, "visionzip_contextual": 8}, r"contextual < budget"),
    ({"architectures": [LLAVA], "visionzip_budget": 8, "vision_feature_layer": [-2, -1]},
     r"vision_feature_layer must be a single int.*\[-2, -1\]"),
])
def test_llava_settings(llava_ckpt, overrides, match):
    fails(llava_ckpt[0], match, hf_overrides=overrides)


def test_image_embedding_inputs_are_refused(llava_ckpt):
    fails(llava_ckpt[0], r"enable_mm_embeds=True is not supported", hf_overrides=hf_overrides(
        "LlavaForConditionalGeneration", 8), enable_mm_embeds=True)
    with pytest.raises(ValueError, match="bypass the vision tower"):
        reject_embeddings({"image_embeds": object()}, LLAVA)


def test_wrong_architecture_for_the_checkpoint(llava_ckpt, qwen2_ckpt):
    fails(qwen2_ckpt[0], r"serves model_type llava, but the checkpoint is 'qwen2_vl'", TypeError,
          hf_overrides=hf_overrides("LlavaForConditionalGeneration", 8))
    fails(qwen2_ckpt[0], r"serves model_type qwen2_5_vl, but the checkpoint is 'qwen2_vl'", TypeError,
          hf_overrides=hf_overrides("Qwen2_5_VLForConditionalGeneration", 8))
    with pytest.raises(ValueError, match="no VisionZip architecture for 'Gemma3ForConditionalGeneration'"):
        hf_overrides("Gemma3ForConditionalGeneration", 8)


def test_unsupported_vision_tower(llava_ckpt, tmp_path):
    """A LLaVA checkpoint with a SigLIP tower (no CLS token to score with). The error comes before
    any weight is read, so the configuration and the processor files are enough."""
    from transformers import SiglipVisionConfig

    src = llava_ckpt[0]
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(src, name), tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"] = SiglipVisionConfig(image_size=84, patch_size=14, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=3, num_attention_heads=4).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    fails(str(tmp_path), r"only CLIP vision towers are supported.*'siglip_vision_model'",
          hf_overrides=hf_overrides("LlavaForConditionalGeneration", 8))


def test_qwen_engine_options(qwen25_ckpt):
    overrides = hf_overrides("Qwen2_5_VLForConditionalGeneration", 8)
    fails(qwen25_ckpt[0], r"mm_encoder_tp_mode='data' is not supported", hf_overrides=overrides,
          mm_encoder_tp_mode="data")
    fails(qwen25_ckpt[0], r"video_pruning_rate \(EVS\) cannot be combined", hf_overrides=overrides,
          video_pruning_rate=0.5)


def test_worker_side_checks():
    """Checked where a Qwen model is built (the worker has the whole configuration)."""

    class Mode:
        def __init__(self, name, mixed):
            self.name, self._mixed = name, mixed

        def mixed_mode(self):
            return SimpleNamespace(name=self._mixed)

    def config(pp=1, mode=Mode("FULL_AND_PIECEWISE", "PIECEWISE")):
        return SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=pp),
                               compilation_config=SimpleNamespace(cudagraph_mode=mode))

    check_position_engine(config(), "X")
    with pytest.raises(ValueError, match="pipeline parallelism is not supported"):
        check_position_engine(config(pp=2), "X")
    with pytest.raises(ValueError, match="cudagraph_mode=FULL replays batches with prefill"):
        check_position_engine(config(mode=Mode("FULL", "FULL")), "X")


def test_micro_batches():
    assert micro_batches([36] * 5, 72) == [(0, 2), (2, 4), (4, 5)]
    assert micro_batches([100, 10, 10], 72) == [(0, 1), (1, 3)]  # an item above the limit runs alone
    assert micro_batches([], 72) == []
