"""VisionZip on Hugging Face transformers models, with tiny random-weight models built from configs.

Every model and processor is built locally from configs (no download). The checks: generate runs,
the LLM receives exactly the budgeted number of image tokens, the image features equal the oracle
(``compress_reference``) on tensors captured independently from the tower, SDPA and eager towers pick
the same tokens, batches, text-agnostic reuse, exact removal, independence of two models, the
placeholder-mismatch error, and (Qwen) the M-RoPE positions of the kept tokens.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from tests.tf_models import (  # noqa: E402
    IMAGE,
    PROMPT,
    QWEN_PROMPT,
    LMInputs,
    build_llava,
    build_llava_next,
    build_onevision,
    build_qwen,
    capture_clip_layer,
    gen,
    image,
    image_rows,
    images,  # noqa: F401  (fixture)
    llava,  # noqa: F401  (fixture)
    oracle_from_capture,
    qwen_oracle,
)
from visionzip_kernels import cls_scores_reference, compress_reference  # noqa: E402
from visionzip_kernels.integrations.transformers import (  # noqa: E402
    apply_visionzip,
    apply_visionzip_processor,
    remove_visionzip,
    remove_visionzip_processor,
)

# --------------------------------------------------------------------------------------------
# LLaVA
# --------------------------------------------------------------------------------------------


def test_llava_generate_and_token_count(llava, images):
    model, proc = llava
    handle = apply_visionzip(model, budget=8, processor=proc)
    try:
        inputs = proc(images=images[:1], text=[PROMPT], return_tensors="pt")
        assert int((inputs.input_ids == IMAGE).sum()) == 8
        rec = LMInputs(model)
        out = gen(model, inputs)
        rec.close()
        assert out.shape[1] == inputs.input_ids.shape[1] + 3
        # prefill: prompt length with 8 image tokens (vs 25 unpatched)
        assert rec.calls[0]["inputs_embeds"].shape[1] == inputs.input_ids.shape[1]
    finally:
        handle.remove()
    assert int((proc(images=images[:1], text=[PROMPT], return_tensors="pt").input_ids == IMAGE).sum()) == 25


def test_llava_beam_search_and_several_sequences(llava, images):
    """Beams x returned sequences repeat the prompt: every row's prefill holds the compressed features."""
    model, proc = llava
    handle = apply_visionzip(model, budget=8, processor=proc)
    rec = LMInputs(model)
    try:
        inputs = proc(images=images[:2], text=[PROMPT, PROMPT], return_tensors="pt")
        feats = model.model.get_image_features(pixel_values=inputs.pixel_values, return_dict=True).pooler_output
        out = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False,
                             pad_token_id=0)
        assert out.shape == (4, inputs.input_ids.shape[1] + 3)
        prefill = rec.calls[0]["inputs_embeds"]
        assert prefill.shape[0] == 4
        for row in range(4):
            got = prefill[row][inputs.input_ids[row // 2] == IMAGE]
            torch.testing.assert_close(got, feats[row // 2].to(got.dtype), rtol=1e-5, atol=1e-6)
    finally:
        rec.close()
        handle.remove()


def test_llava_features_match_reference(llava, images):
    model, proc = llava
    budget = 10
    with torch.no_grad():
        handle = apply_visionzip(model, budget=budget, processor=proc)
        try:
            inputs = proc(images=images, text=[PROMPT, PROMPT], return_tensors="pt")
            store, hooks, attn = capture_clip_layer(model)
            got = image_rows(model, inputs)
            for hk in hooks:
                hk.remove()
            ref = oracle_from_capture(store, attn, budget, has_cls=True)
            expected = model.model.multi_modal_projector(ref.output)
            torch.testing.assert_close(got.view(2, budget, -1), expected, rtol=1e-5, atol=1e-6)
            # the kept indices are exposed and agree with the oracle; CLS is kept
            feats = model.model.get_image_features(inputs.pixel_values, return_dict=True)
            assert torch.equal(torch.stack(feats.dominant_indices), ref.dominant_indices)
            assert torch.equal(torch.stack(feats.contextual_indices), ref.contextual_indices)
            assert (ref.dominant_indices[:, 0] == 0).all()
        finally:
            handle.remove()


def test_llava_sdpa_and_eager_select_same_tokens(images):
    sdpa, proc = build_llava("sdpa", seed=3)
    eager, _ = build_llava("eager", seed=3)
    assert sdpa.model.vision_tower.config._attn_implementation == "sdpa"
    assert eager.model.vision_tower.config._attn_implementation == "eager"
    pixel = proc.image_processor(images, return_tensors="pt").pixel_values
    with torch.no_grad():
        # the q/k scores equal the CLS row of the eager tower's own attention probabilities
        full = eager.model.vision_tower(pixel, output_attentions=True, output_hidden_states=True)
        cls_row = full.attentions[-2][:, :, 0, :].sum(1)
        store, hooks, attn = capture_clip_layer(sdpa)
        sdpa.model.vision_tower(pixel)
        for hk in hooks:
            hk.remove()
        q = store["q"].view(2, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = store["k"].view(2, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
        torch.testing.assert_close(cls_scores_reference(q[:, :, 0], k, scale=attn.scale), cls_row, rtol=1e-4,
                                   atol=1e-6)
        hs = apply_visionzip(sdpa, budget=12)
        he = apply_visionzip(eager, budget=12)
        try:
            a = sdpa.model.get_image_features(pixel, return_dict=True)
            b = eager.model.get_image_features(pixel, return_dict=True)
        finally:
            hs.remove()
            he.remove()
    for x, y in zip(a.kept_indices, b.kept_indices):
        assert torch.equal(x, y)
    torch.testing.assert_close(torch.stack(a.pooler_output), torch.stack(b.pooler_output), rtol=1e-4, atol=1e-5)
    # and the same as the oracle on the official form (full eager attention of the selection layer)
    ref = compress_reference(full.hidden_states[-2], full.attentions[-2], 12,
                             keys=k.mean(1).float(), has_cls=True)
    assert torch.equal(torch.stack(a.dominant_indices), ref.dominant_indices)


def test_llava_batch_of_two_equals_single(llava, images):
    model, proc = llava
    handle = apply_visionzip(model, budget=8, processor=proc)
    try:
        with torch.no_grad():
            both = image_rows(model, proc(images=images, text=[PROMPT, PROMPT], return_tensors="pt"))
            one = [image_rows(model, proc(images=[im], text=[PROMPT], return_tensors="pt")) for im in images]
        torch.testing.assert_close(both, torch.cat(one), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(one[0], one[1])
        out = gen(model, proc(images=images, text=[PROMPT, "USER: <image> describe it ASSISTANT:"],
                               return_tensors="pt", padding=True))
        assert out.shape[0] == 2
    finally:
        handle.remove()


def test_llava_multi_turn_reuses_compressed_tokens(llava, images):
    model, proc = llava
    handle = apply_visionzip(model, budget=8, processor=proc)
    try:
        turn1 = proc(images=images[:1], text=[PROMPT], return_tensors="pt")
        gen(model, turn1)
        turn2_text = PROMPT + " w1 w2 USER: and now describe it ASSISTANT:"
        turn2 = proc(images=images[:1], text=[turn2_text], return_tensors="pt")
        with torch.no_grad():
            f1 = image_rows(model, turn1)
            f2 = image_rows(model, turn2)
        assert torch.equal(f1, f2)  # text-agnostic: the question does not change the kept tokens
        assert int((turn2.input_ids == IMAGE).sum()) == 8
        gen(model, turn2)
    finally:
        handle.remove()


def test_llava_remove_restores_exactly(llava, images):
    model, proc = llava
    inputs = proc(images=images[:1], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits
    dict_model, dict_base = dict(model.__dict__), dict(model.model.__dict__)
    proc_dict = dict(proc.__dict__)
    apply_visionzip(model, budget=8, processor=proc)
    assert "get_image_features" in model.model.__dict__
    with pytest.raises(RuntimeError, match="already applied"):
        apply_visionzip(model, budget=8)
    remove_visionzip(model)
    assert model.__dict__ == dict_model and model.model.__dict__ == dict_base and proc.__dict__ == proc_dict
    with torch.no_grad():
        after = model(**proc(images=images[:1], text=[PROMPT], return_tensors="pt")).logits
    assert torch.equal(before, after)
    with pytest.raises(ValueError, match="not applied"):
        remove_visionzip(model)


def test_two_models_are_independent(images):
    a, proc_a = build_llava(seed=5)
    b, proc_b = build_llava(seed=5)
    full_inputs = proc_b(images=images[:1], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        ref = b(**full_inputs).logits
        apply_visionzip(a, budget=8, processor=proc_a)
        apply_visionzip(b, budget=12)
        remove_visionzip(b)  # b patched and unpatched while a stays patched
        assert torch.equal(b(**full_inputs).logits, ref)
        assert image_rows(a, proc_a(images=images[:1], text=[PROMPT], return_tensors="pt")).shape[0] == 8
        assert type(a).get_image_features is type(b).get_image_features  # classes untouched
        remove_visionzip(a)


def test_mismatch_error_names_the_processor(llava, images):
    model, proc = llava
    handle = apply_visionzip(model, budget=8)  # processor left alone
    try:
        inputs = proc(images=images[:1], text=[PROMPT], return_tensors="pt")
        with pytest.raises(ValueError, match=r"25 image placeholder tokens.*8 rows.*apply_visionzip_processor"):
            model(**inputs)
    finally:
        handle.remove()


def test_processor_patch_roundtrip_and_arguments(llava):
    model, proc = llava
    before = dict(proc.__dict__)
    apply_visionzip_processor(proc, budget=16)
    with pytest.raises(RuntimeError):
        apply_visionzip_processor(proc, budget=16)
    remove_visionzip_processor(proc)
    assert proc.__dict__ == before
    with pytest.raises(ValueError, match="dominant \\+ contextual"):
        apply_visionzip(model, budget=64, dominant=50, contextual=10)
    with pytest.raises(ValueError, match="contextual < budget"):
        apply_visionzip(model, budget=8, contextual=8)
    with pytest.raises(TypeError, match="unsupported model"):
        apply_visionzip(torch.nn.Linear(2, 2))
    h = apply_visionzip(model, budget=8, dominant=8)  # pure pruning: Cx = 0
    assert (h.dominant, h.contextual) == (8, 0)
    h.remove()


# --------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["2", "2.5"])
def qwen(request):
    return build_qwen(request.param)


def test_qwen_generate_features_and_positions(qwen):
    model, proc = qwen
    imgs = [image(3, 100, 90), image(4, 150, 130)]
    texts = [QWEN_PROMPT, "USER: describe it <|vision_start|> <|image_pad|> <|vision_end|> ?"]
    plain = proc(images=imgs, text=texts, return_tensors="pt", padding=True)
    rec = LMInputs(model)
    with torch.no_grad():
        model(**plain)
    base_pos = rec.calls[-1]["position_ids"]
    budget = 8
    handle = apply_visionzip(model, budget=budget, processor=proc)
    try:
        inputs = proc(images=imgs, text=texts, return_tensors="pt", padding=True)
        units = (inputs.image_grid_thw.prod(-1) // 4).tolist()
        assert units[0] > budget and units[1] > budget
        assert [int(r.sum()) for r in (inputs.input_ids == IMAGE)] == [budget, budget]
        with torch.no_grad():
            model(**inputs)
        pos = rec.calls[-1]["position_ids"]
        embeds = rec.calls[-1]["inputs_embeds"]
        feats = model.model.get_image_features(inputs.pixel_values, inputs.image_grid_thw, return_dict=True)
        # features = oracle on independently captured tensors
        groups, _, _ = qwen_oracle(model, inputs.pixel_values, inputs.image_grid_thw, budget)
        oracle = [g[0] for g in groups]  # an image is one temporal group
        for i in range(2):
            torch.testing.assert_close(feats.pooler_output[i], oracle[i].output[0], rtol=1e-5, atol=1e-6)
            assert torch.equal(feats.dominant_indices[i], oracle[i].dominant_indices[0])
        # the LLM receives exactly the compressed features at the placeholders
        for b in range(2):
            rows = embeds[b][inputs.input_ids[b] == IMAGE]
            torch.testing.assert_close(rows, feats.pooler_output[b], rtol=1e-5, atol=1e-6)
        # M-RoPE: each kept token has the position of the token it stands for; text keeps its position
        for b in range(2):
            img_c = inputs.input_ids[b] == IMAGE
            img_p = plain.input_ids[b] == IMAGE
            expect_img = base_pos[-3:, b][:, img_p][:, feats.kept_indices[b]]
            assert torch.equal(pos[-3:, b][:, img_c], expect_img)
            txt_c = (inputs.attention_mask[b] == 1) & ~img_c
            txt_p = (plain.attention_mask[b] == 1) & ~img_p
            assert torch.equal(pos[-3:, b][:, txt_c], base_pos[-3:, b][:, txt_p])
        # generate: same positions at prefill, then runs
        rec.calls.clear()
        out = gen(model, inputs)
        assert out.shape[1] == inputs.input_ids.shape[1] + 3
        assert torch.equal(rec.calls[0]["position_ids"][-3:], pos[-3:])
    finally:
        rec.close()
        handle.remove()


def test_qwen_small_image_keeps_all_and_remove_restores(qwen):
    model, proc = qwen
    img = image(5, 56, 56)  # 2x2 merged tokens <= budget: kept as is
    inputs = proc(images=[img], text=[QWEN_PROMPT], return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits
        handle = apply_visionzip(model, budget=8, processor=proc)
        patched = proc(images=[img], text=[QWEN_PROMPT], return_tensors="pt")
        assert torch.equal(patched.input_ids, inputs.input_ids)
        torch.testing.assert_close(model(**patched).logits, before, rtol=1e-5, atol=1e-5)
        handle.remove()
        assert torch.equal(model(**inputs).logits, before)
        # a patched model fed an unpatched processor's input: clear error
        apply_visionzip(model, budget=8)
        try:
            with pytest.raises(ValueError, match="apply_visionzip_processor"):
                model(**proc(images=[image(6, 150, 130)], text=[QWEN_PROMPT], return_tensors="pt"))
        finally:
            remove_visionzip(model)
        assert torch.equal(model(**inputs).logits, before)


def test_qwen_sdpa_and_eager_select_same_tokens(qwen):
    model, proc = qwen
    inputs = proc(images=[image(4, 150, 130)], text=[QWEN_PROMPT], return_tensors="pt")
    visual = model.model.visual
    handle = apply_visionzip(model, budget=8, processor=proc)
    try:
        with torch.no_grad():
            a = model.model.get_image_features(inputs.pixel_values, inputs.image_grid_thw, return_dict=True)
            visual.set_attn_implementation("eager")
            assert visual.config._attn_implementation == "eager"
            b = model.model.get_image_features(inputs.pixel_values, inputs.image_grid_thw, return_dict=True)
    finally:
        visual.set_attn_implementation("sdpa")
        handle.remove()
    assert torch.equal(a.kept_indices[0], b.kept_indices[0])
    torch.testing.assert_close(a.pooler_output[0], b.pooler_output[0], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# LLaVA-NeXT / LLaVA-OneVision
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("builder,has_cls", [(build_llava_next, True), (build_onevision, False)])
def test_anyres_models_per_crop_layout(builder, has_cls):
    model, proc = builder()
    img = image(7, 60, 100)
    plain = proc(images=[img], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        before = model(**plain).logits
    budget = 4
    handle = apply_visionzip(model, budget=budget, processor=proc, layout="per_crop")
    try:
        inputs = proc(images=[img], text=[PROMPT], return_tensors="pt")
        crops = int(inputs.pixel_values.shape[1])
        assert int((inputs.input_ids == IMAGE).sum()) == crops * budget + 1 < int((plain.input_ids == IMAGE).sum())
        store, hooks, attn = capture_clip_layer(model)
        feats = image_rows(model, inputs)
        for hk in hooks:
            hk.remove()
        ref = oracle_from_capture(store, attn, budget, has_cls=has_cls)  # one row per crop
        expected = model.model.multi_modal_projector(ref.output).flatten(0, 1)
        torch.testing.assert_close(feats[:-1], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(feats[-1], model.model.image_newline.to(feats))  # trailing newline
        assert gen(model, inputs).shape[1] == inputs.input_ids.shape[1] + 3
    finally:
        handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**plain).logits, before)


@pytest.mark.parametrize("size,grid", [((42, 84), (1, 2)), ((84, 42), (2, 1)), ((84, 84), (2, 2))],
                         ids=["1x2", "2x1", "2x2"])
def test_llava_next_official_layout_token_for_token(size, grid):
    """LLaVA-NeXT's default layout is VisionZip's own: every token the LLM receives equals the
    transcription of the official code (tests/official_visionzip.py) applied to the oracle's
    compression of the captured crops; the processor emits (1 + P) k placeholders."""
    from tests.official_visionzip import official_image_features
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    model, proc = build_llava_next()
    img = image(11, *size)
    budget = 4
    handle = apply_visionzip(model, budget=budget, processor=proc)
    assert handle.options == {"layout": "official"}
    try:
        inputs = proc(images=[img], text=[PROMPT], return_tensors="pt")
        crops = int(inputs.pixel_values.shape[1])
        cfg = model.config
        assert tuple(get_anyres_image_grid_shape(inputs.image_sizes[0].tolist(), cfg.image_grid_pinpoints,
                                                 cfg.vision_config.image_size)) == grid
        assert crops == 1 + grid[0] * grid[1]
        assert int((inputs.input_ids == IMAGE).sum()) == crops * budget  # no image_newline
        store, hooks, attn = capture_clip_layer(model)
        feats = image_rows(model, inputs)
        for hk in hooks:
            hk.remove()
        ref = oracle_from_capture(store, attn, budget, has_cls=True)
        projected = model.model.multi_modal_projector(ref.output)
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        expected = official_image_features(projected, ref.dominant_indices, grid, side)
        torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-6)
        assert not torch.equal(feats, projected.flatten(0, 1))  # the layout differs from per-crop order
        assert gen(model, inputs).shape[1] == inputs.input_ids.shape[1] + 3
        # a batch of two images of different grids: each laid out on its own grid
        imgs = [img, _image_of_grid((1, 2) if grid != (1, 2) else (2, 2))]
        both = proc(images=imgs, text=[PROMPT, PROMPT], return_tensors="pt", padding=True)
        rows = image_rows(model, both)
        alone = [image_rows(model, proc(images=[im], text=[PROMPT], return_tensors="pt")) for im in imgs]
        torch.testing.assert_close(rows, torch.cat(alone), rtol=1e-5, atol=1e-6)
        assert gen(model, both).shape[0] == 2
    finally:
        handle.remove()


def _image_of_grid(grid):
    """An image the tiny LLaVA-NeXT processor splits into a (rows, cols) grid of 42-pixel crops."""
    return image(12, 42 * grid[0], 42 * grid[1])


def test_qwen_beam_search_positions(qwen):
    """Beam search expands the prompts per beam: every beam's prefill gets its own image's compressed
    features at the placeholders and its prompt's positions (two images of different grids, so a
    mix-up shows), and decoding continues after the image's original extent (rope deltas of the
    expanded batch)."""
    model, proc = qwen
    budget = 8
    handle = apply_visionzip(model, budget=budget, processor=proc)
    rec = LMInputs(model)
    try:
        imgs, texts = [image(7, 150, 130), image(8, 100, 220)], [QWEN_PROMPT, QWEN_PROMPT]
        inputs = proc(images=imgs, text=texts, return_tensors="pt", padding=True)
        assert not torch.equal(inputs.image_grid_thw[0], inputs.image_grid_thw[1])
        with torch.no_grad():
            model(**inputs)
        pos1 = rec.calls[-1]["position_ids"]
        feats = model.model.get_image_features(inputs.pixel_values, inputs.image_grid_thw, return_dict=True)
        rec.calls.clear()
        out = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
        assert out.shape == (2, inputs.input_ids.shape[1] + 3)
        prefill, first_step = rec.calls[0], rec.calls[1]
        assert prefill["inputs_embeds"].shape[0] == 4  # rows: prompt 0 beam 0, prompt 0 beam 1, prompt 1 ...
        for row in range(4):
            b = row // 2
            img = inputs.input_ids[b] == IMAGE
            torch.testing.assert_close(prefill["inputs_embeds"][row][img], feats.pooler_output[b], rtol=1e-5,
                                       atol=1e-6)
            assert torch.equal(prefill["position_ids"][-3:, row], pos1[-3:, b])
        # the first generated token sits one past each prompt's largest position, in all M-RoPE rows
        step = first_step["position_ids"][-3:]
        assert step.shape[-1] == 1
        for row in range(4):
            b = row // 2
            assert torch.equal(step[:, row, 0], (pos1[-3:, b].max() + 1).expand(3))
        # features that are not get_image_features' own (nor repeats of them): a clear error
        forged = model.model.get_image_features(inputs.pixel_values, inputs.image_grid_thw, return_dict=True)
        forged.pooler_output = [t.clone() for t in forged.pooler_output]
        with pytest.raises(ValueError, match="not those get_image_features returned"):
            model.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                        mm_token_type_ids=inputs.mm_token_type_ids, image_grid_thw=inputs.image_grid_thw,
                        mm_encoder_outputs={"image": forged})
    finally:
        rec.close()
        handle.remove()


def test_qwen_chunked_prefill_is_a_clear_error(qwen):
    """generate(prefill_chunk_size=...) slices the encoded features and loses the kept indices: the
    positions would be wrong, so the patched model refuses instead of guessing."""
    model, proc = qwen
    handle = apply_visionzip(model, budget=8, processor=proc)
    try:
        inputs = proc(images=[image(9, 150, 130)], text=[QWEN_PROMPT], return_tensors="pt")
        with pytest.raises(NotImplementedError, match="chunked prefill"):
            model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0, prefill_chunk_size=8)
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)  # still fine without
        assert out.shape[1] == inputs.input_ids.shape[1] + 2
    finally:
        handle.remove()
