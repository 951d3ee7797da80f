"""VisionZip on videos (frames are the batch) and on Qwen3-VL, with tiny random-weight models.

Qwen2-VL / Qwen2.5-VL / Qwen3-VL videos: every temporal group (``temporal_patch_size`` frames) is
reduced on its own to min(k, merged tokens); the LLM receives exactly the oracle's rows of every
group, and each reduced token the M-RoPE position (t, h, w) the unpatched model gives the token it
stands for (its time component kept); text keeps its positions. Qwen3-VL: the deepstack features the
LLM's first layers receive are reduced with the same choices. LLaVA-OneVision videos: every frame
reduced to k rows, then the image_newline. Images and videos mixed in one prompt.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.tf_models import (  # noqa: E402
    IMAGE,
    ONEVISION_VIDEO_PROMPT,
    QWEN_PROMPT,
    QWEN_VIDEO_PROMPT,
    VIDEO,
    LMInputs,
    build_onevision,
    build_qwen,
    build_qwen3,
    capture_clip_layer,
    deepstack_inputs,
    gen,
    image,
    image_rows,
    oracle_from_capture,
    qwen_oracle,
    video,
    with_video_processor,
)
from visionzip_kernels.integrations.transformers import apply_visionzip, remove_visionzip  # noqa: E402


def build(version: str):
    return with_video_processor(build_qwen3() if version == "3" else build_qwen(version))


def needs_mm_encoder_outputs(version: str) -> None:
    """Qwen3-VL needs transformers >= 5.18; before, applying VisionZip is a clear error (and skip)."""
    from visionzip_kernels.integrations.transformers._compat import HAS_MM_ENCODER_OUTPUTS

    if version == "3" and not HAS_MM_ENCODER_OUTPUTS:
        with pytest.raises(NotImplementedError, match="Qwen3-VL needs transformers >= 5.18"):
            apply_visionzip(build_qwen3()[0], budget=4)
        pytest.skip(f"Qwen3-VL is supported from transformers 5.18 (installed: {transformers.__version__})")


@pytest.fixture(scope="module", params=["2", "2.5", "3"])
def qwen_video(request):
    return request.param, build(request.param)


def _run(model, inputs):
    rec = LMInputs(model)
    deep = deepstack_inputs(model) if model.config.model_type == "qwen3_vl" else None
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        rec.close()
        if deep is not None:
            deep.close()
    return rec.calls[-1], (deep.calls[-1] if deep is not None else None)


def _oracle_rows(groups, items):
    """Per item, the oracle's rows: each group's compressed output (or all its rows)."""
    rows = []
    for results, merged in zip(groups, items):
        per = merged.shape[0] // len(results)
        rows.append(torch.cat([r.output[0] if r is not None else merged[g * per:(g + 1) * per]
                               for g, r in enumerate(results)]))
    return rows


def _check_positions(inputs, plain, pos, base_pos, kept, token):
    """Reduced tokens sit at the unpatched positions of the tokens they stand for; text unchanged."""
    for b in range(inputs.input_ids.shape[0]):
        mine = inputs.input_ids[b] == token
        full = plain.input_ids[b] == token
        assert torch.equal(pos[-3:, b][:, mine], base_pos[-3:, b][:, full][:, kept[b]])
        txt, txt_p = (inputs.attention_mask[b] == 1) & ~mine, (plain.attention_mask[b] == 1) & ~full
        if token == VIDEO:  # images stay where they are in both prompts
            txt, txt_p = txt & (inputs.input_ids[b] != IMAGE), txt_p & (plain.input_ids[b] != IMAGE)
        assert torch.equal(pos[-3:, b][:, txt], base_pos[-3:, b][:, txt_p])


def test_qwen_video_features_positions_and_generate(qwen_video):
    version, (model, proc) = qwen_video
    needs_mm_encoder_outputs(version)
    side = 32 if version == "3" else 28
    vids = [video(1, 5, 2 * side, 3 * side), video(2, 4, 3 * side, 2 * side)]  # t = 3 and 2 groups of 6 units
    texts = [QWEN_VIDEO_PROMPT, "USER: describe it <|vision_start|> <|video_pad|> <|vision_end|> ?"]
    plain = proc(videos=vids, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**plain).logits
    base_call, _ = _run(model, plain)
    budget = 4
    handle = apply_visionzip(model, budget=budget, processor=proc)
    try:
        inputs = proc(videos=vids, text=texts, return_tensors="pt", padding=True)
        grids = inputs.video_grid_thw.tolist()
        assert [int(r.sum()) for r in (inputs.input_ids == VIDEO)] == [t * budget for t, _, _ in grids]
        call, deep = _run(model, inputs)
        feats = model.model.get_video_features(inputs.pixel_values_videos, inputs.video_grid_thw, return_dict=True)
        groups, items, deep_rows = qwen_oracle(model, inputs.pixel_values_videos, inputs.video_grid_thw, budget)
        for got, want in zip(feats.pooler_output, _oracle_rows(groups, items)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for b in range(2):  # the LLM receives exactly these rows at the placeholders
            rows = call["inputs_embeds"][b][inputs.input_ids[b] == VIDEO]
            torch.testing.assert_close(rows, feats.pooler_output[b], rtol=1e-5, atol=1e-6)
        _check_positions(inputs, plain, call["position_ids"], base_call["position_ids"], feats.kept_indices, VIDEO)
        t_values = call["position_ids"][-3, 0][inputs.input_ids[0] == VIDEO].unique()
        assert t_values.numel() == grids[0][0]  # one time position per temporal group, kept
        if deep is not None:  # Qwen3-VL: the deepstack rows at the visual positions, per layer
            assert len(deep["deepstack_visual_embeds"]) == len(deep_rows[0]) == 2
            for layer, got in enumerate(deep["deepstack_visual_embeds"]):
                want = torch.cat([d[layer] for d in deep_rows])
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        rec = LMInputs(model)
        try:
            out = gen(model, inputs)
        finally:
            rec.close()
        assert out.shape[1] == inputs.input_ids.shape[1] + 3
        assert torch.equal(rec.calls[0]["position_ids"][-3:], call["position_ids"][-3:])
        beams = model.generate(**inputs, max_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False,
                               pad_token_id=0)
        assert beams.shape == (4, inputs.input_ids.shape[1] + 2)
        # text-agnostic: another question about the first video gets the same reduced rows
        turn2 = proc(videos=vids[:1], text=["USER: w1 w2 <|vision_start|> <|video_pad|> <|vision_end|> and now ?"],
                     return_tensors="pt")
        call2, _ = _run(model, turn2)
        assert torch.equal(call2["inputs_embeds"][0][turn2.input_ids[0] == VIDEO], feats.pooler_output[0])
    finally:
        handle.remove()
    assert "get_video_features" not in model.model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**plain).logits, before)


@pytest.mark.parametrize("version", ["2.5", "3"])
def test_qwen_images_and_videos_in_one_prompt(version):
    """An image and a video in one prompt: each reduced on its own, counted by the processor,
    positioned at its own kept tokens."""
    needs_mm_encoder_outputs(version)
    model, proc = build(version)
    side = 32 if version == "3" else 28
    img, vid = image(3, 3 * side, 4 * side), video(4, 4, 2 * side, 2 * side)
    text = "USER: <|vision_start|> <|image_pad|> <|vision_end|> and <|vision_start|> <|video_pad|> <|vision_end|> ?"
    plain = proc(images=[img], videos=[vid], text=[text], return_tensors="pt")
    base_call, _ = _run(model, plain)
    budget = 3
    handle = apply_visionzip(model, budget=budget, processor=proc)
    try:
        inputs = proc(images=[img], videos=[vid], text=[text], return_tensors="pt")
        assert int((inputs.input_ids == IMAGE).sum()) == budget
        assert int((inputs.input_ids == VIDEO).sum()) == int(inputs.video_grid_thw[0, 0]) * budget
        call, _ = _run(model, inputs)
        img_feats = model.model.get_image_features(inputs.pixel_values, inputs.image_grid_thw, return_dict=True)
        vid_feats = model.model.get_video_features(inputs.pixel_values_videos, inputs.video_grid_thw,
                                                   return_dict=True)
        for token, feats in ((IMAGE, img_feats), (VIDEO, vid_feats)):
            rows = call["inputs_embeds"][0][inputs.input_ids[0] == token]
            torch.testing.assert_close(rows, feats.pooler_output[0], rtol=1e-5, atol=1e-6)
            mine, full = inputs.input_ids[0] == token, plain.input_ids[0] == token
            want = base_call["position_ids"][-3:, 0][:, full][:, feats.kept_indices[0]]
            assert torch.equal(call["position_ids"][-3:, 0][:, mine], want)
        assert gen(model, inputs).shape[1] == inputs.input_ids.shape[1] + 3
    finally:
        handle.remove()


def test_qwen3_images_features_deepstack_positions_and_removal():
    needs_mm_encoder_outputs("3")
    model, proc = build("3")
    imgs = [image(5, 100, 130), image(6, 150, 120)]
    texts = [QWEN_PROMPT, "USER: describe it <|vision_start|> <|image_pad|> <|vision_end|> ?"]
    plain = proc(images=imgs, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**plain).logits
    base_call, _ = _run(model, plain)
    budget = 5
    handle = apply_visionzip(model, budget=budget, processor=proc)
    try:
        inputs = proc(images=imgs, text=texts, return_tensors="pt", padding=True)
        assert [int(r.sum()) for r in (inputs.input_ids == IMAGE)] == [budget, budget]
        call, deep = _run(model, inputs)
        feats = model.model.get_image_features(inputs.pixel_values, inputs.image_grid_thw, return_dict=True)
        groups, items, deep_rows = qwen_oracle(model, inputs.pixel_values, inputs.image_grid_thw, budget)
        for i in range(2):
            torch.testing.assert_close(feats.pooler_output[i], groups[i][0].output[0], rtol=1e-5, atol=1e-6)
            assert torch.equal(feats.dominant_indices[i], groups[i][0].dominant_indices[0])
            for layer in range(2):
                torch.testing.assert_close(feats.deepstack_features[layer][i], deep_rows[i][layer], rtol=1e-5,
                                           atol=1e-6)
        for layer, got in enumerate(deep["deepstack_visual_embeds"]):
            torch.testing.assert_close(got, torch.cat([d[layer] for d in deep_rows]), rtol=1e-5, atol=1e-6)
        _check_positions(inputs, plain, call["position_ids"], base_call["position_ids"], feats.kept_indices, IMAGE)
        out = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
        assert out.shape == (2, inputs.input_ids.shape[1] + 3)
    finally:
        remove_visionzip(model)
    with torch.no_grad():
        assert torch.equal(model(**plain).logits, before)


def test_onevision_video_frames_reduced():
    model, proc = with_video_processor(build_onevision())
    vid = video(7, 4, 42, 42)  # 4 frames of 3 x 3 patches
    plain = proc(videos=[vid], text=[ONEVISION_VIDEO_PROMPT], return_tensors="pt")
    with torch.no_grad():
        before = model(**plain).logits
    budget = 4
    handle = apply_visionzip(model, budget=budget, processor=proc)
    try:
        inputs = proc(videos=[vid], text=[ONEVISION_VIDEO_PROMPT], return_tensors="pt")
        assert int((inputs.input_ids == VIDEO).sum()) == 4 * budget + 1
        store, hooks, attn = capture_clip_layer(model)
        rows = image_rows(model, inputs, token=VIDEO)
        for hk in hooks:
            hk.remove()
        ref = oracle_from_capture(store, attn, budget, has_cls=False)  # one row per frame
        expected = model.model.multi_modal_projector(ref.output).flatten(0, 1)
        torch.testing.assert_close(rows[:-1], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rows[-1], model.model.image_newline.to(rows))
        assert gen(model, inputs).shape[1] == inputs.input_ids.shape[1] + 3
    finally:
        handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**plain).logits, before)


def test_unsupported_video_models_are_a_clear_error():
    """LLaVA-NeXT-Video is another model type: refused at apply time, naming the supported ones."""
    cfg = transformers.LlavaNextVideoConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, image_size=42, patch_size=14),
        text_config=transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                             num_attention_heads=4, vocab_size=64))
    model = transformers.LlavaNextVideoForConditionalGeneration(cfg).eval()
    with pytest.raises(TypeError, match=r"model_type 'llava_next_video'.*supported model types: .*qwen3_vl"):
        apply_visionzip(model, budget=8)
