"""With the plugin installed but not opted in, vLLM's own LLaVA serves the checkpoint exactly as
without the plugin: vLLM's class, all 36 image tokens, the unpatched transformers model's features
and greedy tokens."""

from __future__ import annotations

import importlib.metadata

import torch

from tests.vllm import probes
from tests.vllm.checkpoints import LLAVA_PROMPT
from tests.vllm.conftest import start_engine, stop_engine
from tests.vllm.test_llava import PATCHES, fresh_images, greedy, hf_greedy


def test_plugin_is_loaded_but_stock_architecture_unchanged(llava_ckpt):
    from vllm import ModelRegistry

    path, model, processor = llava_ckpt
    plugins = {e.name: e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("visionzip") == "visionzip_kernels.integrations.vllm:register"
    llm = start_engine(path)
    try:
        # the entry point ran in this (front-end) process: the VisionZip architectures are known
        assert "VisionZipLlavaForConditionalGeneration" in ModelRegistry.get_supported_archs()
        assert llm.apply_model(probes.record) == ["vllm.model_executor.models.llava.LlavaForConditionalGeneration"]
        image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
        for im in fresh_images(30)[:2]:
            out = greedy(llm, [{"prompt": LLAVA_PROMPT, "multi_modal_data": {"image": im}}])[0]
            got = llm.apply_model(probes.take)[0]
            assert out.prompt_token_ids.count(image_id) == PATCHES
            inputs = processor(images=im, text=LLAVA_PROMPT, return_tensors="pt")
            assert out.prompt_token_ids == inputs.input_ids[0].tolist()
            with torch.no_grad():
                ref = model.model.get_image_features(inputs.pixel_values, return_dict=True).pooler_output
            torch.testing.assert_close(got["embeds"][0][0], ref[0], rtol=1e-4, atol=1e-5)
            assert list(out.outputs[0].token_ids) == hf_greedy(model, inputs)
    finally:
        stop_engine(llm)
