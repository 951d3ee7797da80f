"""LLaVA-1.5 served by vLLM with VisionZip, against the transformers integration on the same weights.

One engine at tensor parallel 1 (encoder budget 72 tokens: the tower runs on at most 2 crops per
call) and one at tensor parallel 2. Tolerances: float32 everywhere; vLLM's CLIP (fused QKV, its own
SDPA call) and transformers' differ by rounding only, so features agree to rtol 1e-4 / atol 1e-5 and
the kept tokens exactly.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from tests.vllm import probes
from tests.vllm.checkpoints import LLAVA_PROMPT
from tests.vllm.conftest import start_engine, stop_engine
from visionzip_kernels.integrations.transformers import apply_visionzip
from visionzip_kernels.integrations.vllm import hf_overrides

BUDGET, CONTEXTUAL = 10, 2
PATCHES = 36  # 84 px / patch 14 -> 6 x 6 (+ CLS)


def image(seed: int, h: int, w: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


IMAGES = [image(1, 84, 84), image(2, 60, 90), image(3, 200, 120)]


def fresh_images(seed: int) -> list[Image.Image]:
    """New images of IMAGES' sizes: an image seen before is served from vLLM's encoder cache without
    running the encoder again, which the probes would not see."""
    return [image(seed + i, im.height, im.width) for i, im in enumerate(IMAGES)]


def overrides() -> dict:
    return hf_overrides("LlavaForConditionalGeneration", BUDGET, CONTEXTUAL)


def greedy(llm, prompts: list[dict], n: int = 6):
    from vllm import SamplingParams

    return llm.generate(prompts, SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0), use_tqdm=False)


def hf_greedy(model, inputs, n: int = 6) -> list[int]:
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=3)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def engine(llava_ckpt):
    llm = start_engine(llava_ckpt[0], hf_overrides=overrides(), max_num_batched_tokens=72)
    assert llm.apply_model(probes.record) == [
        "visionzip_kernels.integrations.vllm.llava.VisionZipLlavaForConditionalGeneration"]
    yield llm
    stop_engine(llm)


@pytest.fixture(scope="module")
def engine_tp2(llava_ckpt):
    llm = start_engine(llava_ckpt[0], tp=2, hf_overrides=overrides())
    llm.apply_model(probes.record)
    yield llm
    stop_engine(llm)


@pytest.fixture(scope="module")
def patched(llava_ckpt):
    """The transformers model and processor of the same checkpoint with the transformers integration."""
    _, model, processor = llava_ckpt
    handle = apply_visionzip(model, budget=BUDGET, contextual=CONTEXTUAL, processor=processor)
    yield model, processor
    handle.remove()


def test_placeholder_counts(engine, llava_ckpt):
    """Every image, whatever its size, becomes BUDGET placeholders (vLLM's own prompt replacement, fed
    by the processing info); the encoder budget counts them too."""
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.encoder_budget import MultiModalBudget

    tok = llava_ckpt[2].tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    text_tokens = len(tok(LLAVA_PROMPT).input_ids) - 1
    outs = greedy(engine, [{"prompt": LLAVA_PROMPT, "multi_modal_data": {"image": im}} for im in IMAGES], n=1)
    for out in outs:
        assert out.prompt_token_ids.count(image_id) == BUDGET
        assert len(out.prompt_token_ids) == text_tokens + BUDGET
    two = greedy(engine, [{"prompt": "USER: <image> <image> What is this ? ASSISTANT:",
                           "multi_modal_data": {"image": IMAGES[:2]}}], n=1)[0]
    assert two.prompt_token_ids.count(image_id) == 2 * BUDGET
    budget = MultiModalBudget(engine.llm_engine.vllm_config, MULTIMODAL_REGISTRY)
    assert dict(budget.mm_max_toks_per_item) == {"image": BUDGET}
    engine.apply_model(probes.take)


def test_features_and_tokens_match_transformers(engine, patched):
    """The rows the language model receives and the greedy tokens equal the transformers
    integration's (apply_visionzip) for the same weights and images."""
    model, processor = patched
    for im in fresh_images(10)[:2]:
        out = greedy(engine, [{"prompt": LLAVA_PROMPT, "multi_modal_data": {"image": im}}])[0]
        got = engine.apply_model(probes.take)[0]
        inputs = processor(images=im, text=LLAVA_PROMPT, return_tensors="pt")
        assert out.prompt_token_ids == inputs.input_ids[0].tolist()  # same placeholders, same place
        with torch.no_grad():
            ref = model.model.get_image_features(inputs.pixel_values, return_dict=True)
        assert len(got["embeds"]) == 1 and len(got["kept"]) == 1
        assert torch.equal(got["kept"][0][0], ref.kept_indices[0])
        torch.testing.assert_close(got["embeds"][0][0], ref.pooler_output[0], rtol=1e-4, atol=1e-5)
        assert list(out.outputs[0].token_ids) == hf_greedy(model, inputs)


def test_tower_runs_in_micro_batches(engine, llava_ckpt):
    """With an encoder budget of 72 tokens the unpatched engine would encode 2 images (576-token
    style counts: 36 each) per step; VisionZip's counts (10 each) let 7 through, so the tower is run
    on at most 2 crops at a time and its memory stays what vLLM profiled for the unpatched model."""
    pixels = llava_ckpt[2].image_processor(IMAGES + IMAGES[:2], return_tensors="pt").pixel_values
    assert engine.apply_model(partial(probes.tower_batches, pixel_values=pixels)) == [[2, 2, 1]]
    engine.apply_model(probes.take)


def test_tensor_parallel_2_equals_1(engine, engine_tp2):
    """Heads split over two ranks: scores and keys are combined across ranks, so both ranks keep the
    same tokens as one rank does, and the outputs agree."""
    prompts = [{"prompt": LLAVA_PROMPT, "multi_modal_data": {"image": im}} for im in fresh_images(20)]
    one = greedy(engine, prompts)
    rec_one = engine.apply_model(probes.take)[0]
    two = greedy(engine_tp2, prompts)
    rank0, rank1 = engine_tp2.apply_model(probes.take)
    assert [list(o.outputs[0].token_ids) for o in two] == [list(o.outputs[0].token_ids) for o in one]
    kept_one = torch.cat([k for k in rec_one["kept"]])
    for rank in (rank0, rank1):
        assert torch.equal(torch.cat(rank["kept"]), kept_one)
        torch.testing.assert_close(torch.cat([torch.cat(list(e)) for e in rank["embeds"]]),
                                   torch.cat([torch.cat(list(e)) for e in rec_one["embeds"]]), rtol=1e-4, atol=1e-5)
