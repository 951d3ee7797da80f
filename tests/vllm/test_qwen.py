"""Qwen2-VL and Qwen2.5-VL served by vLLM with VisionZip, against the transformers integration.

Checked per model: placeholder counts (small images keep all their merged tokens), the reduced rows
and kept tokens, the M-RoPE positions the language model receives (each kept token at the position of
the token it stands for, text after an image as without reduction), greedy tokens; Qwen2-VL also at
tensor parallel 2. The Qwen2-VL engine runs with vLLM's default compilation (the language model
compiled, the positions fixed before it), the others eager; the Qwen2.5-VL engine prefills in chunks
of 16 tokens, so an image's tokens arrive over two steps. Tolerances as in test_llava.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.vllm import probes
from tests.vllm.checkpoints import QWEN_PROMPT
from tests.vllm.conftest import start_engine, stop_engine
from visionzip_kernels.integrations.transformers import apply_visionzip
from visionzip_kernels.integrations.vllm import hf_overrides
from visionzip_kernels.integrations.vllm.base import POSITION_CHANNELS, detach_positions

BUDGET = 8
ARCH = {"2": "Qwen2VLForConditionalGeneration", "2.5": "Qwen2_5_VLForConditionalGeneration"}
TWO_IMAGES = ("<|im_start|> user <|vision_start|> <|image_pad|> <|vision_end|> What is this ? "
              "<|vision_start|> <|image_pad|> <|vision_end|> describe <|im_end|> <|im_start|> assistant")


def image(seed: int, h: int, w: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def greedy(llm, prompts: list[dict], n: int = 6):
    from vllm import SamplingParams

    return llm.generate(prompts, SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0), use_tqdm=False)


@pytest.fixture(scope="module", params=["2", "2.5"])
def qwen(request, qwen2_ckpt, qwen25_ckpt):
    """(version, engine, transformers model with apply_visionzip, processor)."""
    version = request.param
    path, model, processor = qwen2_ckpt if version == "2" else qwen25_ckpt
    # Qwen2.5-VL: 16 tokens per step, so prompts are prefilled in chunks that split an image's tokens
    # (and its tower runs hold at most 16 merged tokens of images, one image if larger)
    options = dict(enforce_eager=False) if version == "2" else dict(max_num_batched_tokens=16)
    llm = start_engine(path, hf_overrides=hf_overrides(ARCH[version], BUDGET),
                       limit_mm_per_prompt={"image": 2, "video": 0}, **options)
    llm.apply_model(probes.record)
    handle = apply_visionzip(model, budget=BUDGET, processor=processor)
    yield version, llm, model, processor
    handle.remove()
    stop_engine(llm)


def hf_reference(model, processor, images, prompt: str, n: int = 6):
    """The transformers integration on the same prompt: input ids, image features, kept indices, the
    M-RoPE positions of the prefill (3, L) and the greedy tokens."""
    inputs = processor(images=images, text=prompt, return_tensors="pt")
    seen = {}

    def first_positions(mod, args, kwargs):
        seen.setdefault("positions", kwargs["position_ids"])

    hook = model.model.language_model.register_forward_pre_hook(first_positions, with_kwargs=True)
    try:
        with torch.no_grad():
            feats = model.model.get_image_features(inputs.pixel_values, inputs.image_grid_thw, return_dict=True)
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    finally:
        hook.remove()
    return inputs, feats, seen["positions"][-3:, 0], out[0, inputs.input_ids.shape[1]:].tolist()


def prefill_positions(calls: list[dict], length: int) -> torch.Tensor:
    """The (3, length) positions of a prompt prefilled by the first forward calls (one request, one or
    several chunks)."""
    return torch.cat([c["positions"] for c in calls], dim=1)[:, :length]


def check_against_transformers(llm, model, processor, images, prompt):
    out = greedy(llm, [{"prompt": prompt, "multi_modal_data": {"image": images}}])[0]
    got = llm.apply_model(probes.take)[0]
    inputs, feats, positions, tokens = hf_reference(model, processor, images, prompt)
    assert out.prompt_token_ids == inputs.input_ids[0].tolist()
    embeds = [e for call in got["embeds"] for e in call]
    width = model.config.text_config.hidden_size
    assert len(embeds) == len(images)
    for i, emb in enumerate(embeds):
        assert emb.shape[1] == width + POSITION_CHANNELS
        rows, _ = detach_positions(emb, width)
        torch.testing.assert_close(rows, feats.pooler_output[i], rtol=1e-4, atol=1e-5)
        assert torch.equal(got["kept"][i][0], feats.kept_indices[i])
    prefill = prefill_positions(got["forward"], len(out.prompt_token_ids))
    assert torch.equal(prefill, positions.to(prefill))
    assert list(out.outputs[0].token_ids) == tokens
    return prefill, got["forward"][0]["positions"].shape[1]


def test_placeholder_counts(qwen):
    """min(BUDGET, merged tokens) placeholders per image: 56 px -> 2 x 2 merged tokens, all kept."""
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.encoder_budget import MultiModalBudget

    _, llm, _, processor = qwen
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    sizes = {(56, 56): 4, (100, 90): BUDGET, (168, 140): BUDGET}
    outs = greedy(llm, [{"prompt": QWEN_PROMPT, "multi_modal_data": {"image": image(i, *hw)}}
                        for i, hw in enumerate(sizes)], n=1)
    assert [o.prompt_token_ids.count(image_id) for o in outs] == list(sizes.values())
    budget = MultiModalBudget(llm.llm_engine.vllm_config, MULTIMODAL_REGISTRY)
    assert budget.mm_max_toks_per_item["image"] == BUDGET
    llm.apply_model(probes.take)


def test_features_positions_and_tokens_match_transformers(qwen):
    _, llm, model, processor = qwen
    prefill, _ = check_against_transformers(llm, model, processor, [image(3, 100, 90)], QWEN_PROMPT)
    # the kept tokens do not sit on consecutive positions: their own (h, w) in the grid
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids = torch.tensor(processor(images=[image(3, 100, 90)], text=QWEN_PROMPT).input_ids[0])
    assert len(set(prefill[1, ids == image_id].tolist())) > 1


def test_two_images_of_different_grids(qwen):
    """The second image's and the text's positions follow the first image's full extent."""
    version, llm, model, processor = qwen
    prefill, first_step = check_against_transformers(llm, model, processor, [image(4, 150, 130), image(5, 84, 168)],
                                                     TWO_IMAGES)
    if version == "2.5":  # prefilled in chunks of 16 tokens
        assert first_step == 16 < prefill.shape[1]


def test_small_image_is_kept_whole(qwen):
    _, llm, model, processor = qwen
    check_against_transformers(llm, model, processor, [image(6, 56, 56)], QWEN_PROMPT)


def test_tensor_parallel_2(qwen2_ckpt):
    """Qwen2-VL at tensor parallel 2 (the tower's heads split over the ranks): both ranks keep the
    same tokens as the transformers integration, with the same positions and greedy tokens."""
    path, model, processor = qwen2_ckpt
    llm = start_engine(path, tp=2, hf_overrides=hf_overrides(ARCH["2"], BUDGET),
                       limit_mm_per_prompt={"image": 2, "video": 0})
    handle = apply_visionzip(model, budget=BUDGET, processor=processor)
    try:
        llm.apply_model(probes.record)
        images = [image(4, 150, 130), image(5, 84, 168)]
        out = greedy(llm, [{"prompt": TWO_IMAGES, "multi_modal_data": {"image": images}}])[0]
        inputs, feats, positions, tokens = hf_reference(model, processor, images, TWO_IMAGES)
        assert list(out.outputs[0].token_ids) == tokens
        for rank in llm.apply_model(probes.take):
            assert [k[0].tolist() for k in rank["kept"]] == [k.tolist() for k in feats.kept_indices]
            prefill = prefill_positions(rank["forward"], len(out.prompt_token_ids))
            assert torch.equal(prefill, positions.to(prefill))
    finally:
        handle.remove()
        stop_engine(llm)
