"""LLaVA-NeXT served by vLLM with VisionZip, in both layouts, against the transformers integration
(same weights, same layout): placeholder counts per crop grid, the rows the language model receives,
greedy tokens. Crops of 42 px (3 x 3 patches + CLS), pinpoints up to 2 x 2 crops. Tolerances as in
test_llava.py."""

from __future__ import annotations

import pytest
import torch

from tests.vllm import probes
from tests.vllm.checkpoints import LLAVA_PROMPT
from tests.vllm.conftest import start_engine, stop_engine
from tests.vllm.test_llava import greedy, hf_greedy, image
from visionzip_kernels.integrations.transformers import apply_visionzip
from visionzip_kernels.integrations.vllm import hf_overrides

BUDGET, CONTEXTUAL = 4, 1
#: (height, width) -> crops (base + sub-crops): 1 x 1, 1 x 2, 2 x 1 and 2 x 2 grids.
SIZES = {(40, 40): 2, (40, 84): 3, (84, 40): 3, (90, 100): 5}


@pytest.fixture(scope="module", params=["official", "per_crop"])
def next_engine(request, llava_next_ckpt):
    """(layout, engine, transformers model with apply_visionzip in that layout, processor)."""
    layout = request.param
    path, model, processor = llava_next_ckpt
    overrides = hf_overrides("LlavaNextForConditionalGeneration", BUDGET, CONTEXTUAL,
                             layout=None if layout == "official" else layout)  # official is the default
    llm = start_engine(path, hf_overrides=overrides)
    llm.apply_model(probes.record)
    handle = apply_visionzip(model, budget=BUDGET, contextual=CONTEXTUAL, processor=processor, layout=layout)
    yield layout, llm, model, processor
    handle.remove()
    stop_engine(llm)


def test_placeholder_counts(next_engine):
    layout, llm, _, processor = next_engine
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    outs = greedy(llm, [{"prompt": LLAVA_PROMPT, "multi_modal_data": {"image": image(i, *hw)}}
                        for i, hw in enumerate(SIZES)], n=1)
    extra = 0 if layout == "official" else 1  # per_crop ends with one image_newline
    assert [o.prompt_token_ids.count(image_id) for o in outs] == [c * BUDGET + extra for c in SIZES.values()]
    llm.apply_model(probes.take)


@pytest.mark.parametrize("size", [(84, 40), (90, 100)])
def test_features_and_tokens_match_transformers(next_engine, size):
    layout, llm, model, processor = next_engine
    im = image(50 + size[0], *size)
    out = greedy(llm, [{"prompt": LLAVA_PROMPT, "multi_modal_data": {"image": im}}])[0]
    got = llm.apply_model(probes.take)[0]
    inputs = processor(images=im, text=LLAVA_PROMPT, return_tensors="pt")
    assert out.prompt_token_ids == inputs.input_ids[0].tolist()
    with torch.no_grad():
        ref = model.model.get_image_features(inputs.pixel_values, inputs.image_sizes, return_dict=True)
    assert torch.equal(torch.cat(got["kept"]), ref.kept_indices[0])  # one row of kept tokens per crop
    torch.testing.assert_close(got["embeds"][0][0], ref.pooler_output[0], rtol=1e-4, atol=1e-5)
    assert list(out.outputs[0].token_ids) == hf_greedy(model, inputs)
