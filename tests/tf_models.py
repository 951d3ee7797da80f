"""Tiny random-weight vision-language models and processors built locally from configs (no
download, no torchvision), and what the transformers tests read from them: the LLM's inputs, the
selection layer captured independently of the integration, the oracle applied to it.

Video processors need torchvision, which does not import beside the CPU torch wheel here: small
stand-ins reproduce the tensors the real ones produce (Qwen's patchified frames, OneVision's frames).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from visionzip_kernels import compress_reference  # noqa: E402

IMAGE, VIDEO = 4, 5
WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>", "<|vision_start|>", "<|vision_end|>",
         "USER:", "ASSISTANT:", "what", "is", "this", "?", "and", "now", "describe", "it"]
PROMPT = "USER: <image> what is this ? ASSISTANT:"


def tokenizer(image_token: str = "<image>", video_token: str = "<video>"):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = list(WORDS)
    words[IMAGE], words[VIDEO] = image_token, video_token
    vocab = {w: i for i, w in enumerate(words)}
    for i in range(40):
        vocab[f"w{i}"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", padding_side="left",
        extra_special_tokens={"image_token": image_token, "video_token": video_token,
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    )


def no_video_processor(cls):
    """The processor class without the video-processor check (video processors need torchvision)."""

    class Processor(cls):
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    return Processor


def image(seed: int, h: int, w: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def text_config(cls, vocab: int):
    return cls(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=1024)


# --------------------------------------------------------------------------------------------
# Model builders
# --------------------------------------------------------------------------------------------


def build_llava(attn: str = "sdpa", seed: int = 0):
    tok = tokenizer()
    ip = transformers.CLIPImageProcessor(size={"shortest_edge": 70}, crop_size={"height": 70, "width": 70})
    proc = transformers.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1)
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, image_size=70, patch_size=14)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=text_config(transformers.LlamaConfig, len(tok)),
                                   image_token_id=IMAGE, vision_feature_layer=-2,
                                   vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    model.model.vision_tower.set_attn_implementation(attn)
    return model, proc


def build_llava_next(seed: int = 0):
    tok = tokenizer()
    pins = [[42, 42], [42, 84], [84, 42], [84, 84]]
    ip = transformers.LlavaNextImageProcessor(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42},
                                              image_grid_pinpoints=pins)
    proc = transformers.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                                           vision_feature_select_strategy="default", num_additional_image_tokens=1)
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, image_size=42, patch_size=14)
    cfg = transformers.LlavaNextConfig(vision_config=vc, text_config=text_config(transformers.LlamaConfig, len(tok)),
                                       image_token_id=IMAGE, image_grid_pinpoints=pins, vision_feature_layer=-2)
    torch.manual_seed(seed)
    return transformers.LlavaNextForConditionalGeneration(cfg).eval(), proc


def build_onevision(seed: int = 0):
    tok = tokenizer()
    pins = [[42, 42], [42, 84], [84, 42], [84, 84]]
    ip = transformers.LlavaOnevisionImageProcessor(size={"height": 42, "width": 42}, image_grid_pinpoints=pins)
    proc = no_video_processor(transformers.LlavaOnevisionProcessor)(
        image_processor=ip, tokenizer=tok, num_image_tokens=9, vision_feature_select_strategy="full")
    vc = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=42, patch_size=14)
    cfg = transformers.LlavaOnevisionConfig(
        vision_config=vc, text_config=text_config(transformers.Qwen2Config, len(tok)), image_token_id=IMAGE,
        video_token_id=VIDEO, image_grid_pinpoints=pins, vision_feature_layer=-2,
        vision_feature_select_strategy="full")
    torch.manual_seed(seed)
    return transformers.LlavaOnevisionForConditionalGeneration(cfg).eval(), proc


def build_qwen(version: str, seed: int = 0):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = tokenizer("<|image_pad|>", "<|video_pad|>")
    ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=168 * 168, patch_size=14, merge_size=2,
                                  temporal_patch_size=2)
    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=6, vision_end_token_id=7)
    if version == "2":
        proc_cls, model_cls = transformers.Qwen2VLProcessor, transformers.Qwen2VLForConditionalGeneration
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    else:
        proc_cls, model_cls = transformers.Qwen2_5_VLProcessor, transformers.Qwen2_5_VLForConditionalGeneration
        # 3 blocks, block 1 full attention, windows of 2x2 merge units: the window order is exercised.
        vision = dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=4,
                      fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)
        cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    proc = no_video_processor(proc_cls)(image_processor=ip, tokenizer=tok)
    torch.manual_seed(seed)
    return model_cls(cfg).eval(), proc


QWEN_PROMPT = "USER: <|vision_start|> <|image_pad|> <|vision_end|> what is this ? ASSISTANT:"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class LMInputs:
    """Records what the language model receives on each call: ``keys`` of its keyword arguments
    (inputs_embeds and position_ids by default)."""

    def __init__(self, model, keys: tuple[str, ...] = ("inputs_embeds", "position_ids")):
        self.calls, self.keys = [], keys
        self._h = model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _mod, args, kwargs):
        self.calls.append({k: kwargs.get(k) for k in self.keys})

    def close(self):
        self._h.remove()


def image_rows(model, inputs, token: int = IMAGE) -> torch.Tensor:
    """One forward; the rows of the LLM's ``inputs_embeds`` at the image placeholders, (tokens, C) for
    the whole batch in order. This is what the language model receives, read the same way on every
    transformers 5.x (``image_hidden_states`` is deprecated from 5.24 and OneVision no longer has it)."""
    rec = LMInputs(model)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        rec.close()
    return rec.calls[-1]["inputs_embeds"][inputs["input_ids"] == token]


def gen(model, inputs, n: int = 3):
    return model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0)


def capture_clip_layer(model, layer_index: int = -2):
    """Independent capture of the selection layer of a CLIP / SigLIP tower: (hidden, q, k) per call."""
    tower = model.model.vision_tower
    layer = tower.encoder.layers[len(tower.encoder.layers) + 1 + layer_index - 1]
    store = {}
    hooks = [
        layer.register_forward_hook(lambda m, a, o: store.__setitem__("hidden", o[0] if isinstance(o, tuple) else o)),
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, o: store.__setitem__("q", o)),
        layer.self_attn.k_proj.register_forward_hook(lambda m, a, o: store.__setitem__("k", o)),
    ]
    return store, hooks, layer.self_attn


def oracle_from_capture(store, attn, budget, has_cls):
    """compress_reference on the captured tensors, scores from an explicit float64 softmax."""
    b, n, c = store["hidden"].shape
    h = attn.num_heads
    q = store["q"].double().view(b, n, h, -1).transpose(1, 2)
    k = store["k"].double().view(b, n, h, -1).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # (B, H, N, N), the full matrix here
    return compress_reference(store["hidden"], probs, budget, keys=k.mean(1).float(), has_cls=has_cls)


def qwen_oracle(model, pixel_values, grid, budget):
    """Per item (image or video): compress_reference on the merger output of each temporal group, with
    scores / keys recomputed here from the captured qkv of the scored block (a full float64 softmax
    per frame group, 2x2 unit means; the deepstack features of Qwen3-VL gathered / merged with the
    oracle's choices). Returns (per item: list over groups of CompressResult or None when the group
    keeps all its tokens, per item merged features, per item per deepstack layer the oracle's rows)."""
    from transformers.vision_utils import get_vision_window_index

    visual = model.model.visual
    full = getattr(visual, "fullatt_block_indexes", None)
    block = visual.blocks[full[-1] if full else len(visual.blocks) - 1]
    store = {}
    hooks = [block.attn.qkv.register_forward_hook(lambda m, a, o: store.__setitem__("qkv", o)),
             block.attn.register_forward_pre_hook(lambda m, a, kw: store.__setitem__("kw", kw), with_kwargs=True)]
    with torch.no_grad():
        out = visual(pixel_values, grid_thw=grid)
    for hk in hooks:
        hk.remove()
    merged = out.pooler_output
    deep = list(getattr(out, "deepstack_features", None) or [])
    mod = __import__(type(block.attn).__module__, fromlist=["x"])
    s = store["qkv"].shape[0]
    q, k, _ = store["qkv"].reshape(s, 3, block.attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = store["kw"]["position_embeddings"]
    qr, kr = mod.apply_rotary_pos_emb_vision(q, k, cos, sin)
    cu = store["kw"]["cu_seqlens"].tolist()
    scores = torch.zeros(s, dtype=torch.float64)
    for a, b in zip(cu[:-1], cu[1:]):
        p = (qr[a:b].double().transpose(0, 1) @ kr[a:b].double().permute(1, 2, 0) * block.attn.scaling).softmax(-1)
        scores[a:b] = p.sum(dim=(0, 1))
    us, uk = scores.view(-1, 4).mean(1), k.double().mean(1).view(-1, 4, k.shape[-1]).mean(1)
    if full:
        win, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=visual.window_size,
                                         patch_size=visual.patch_size)
        rev = torch.argsort(win)
        us, uk = us[rev], uk[rev]
    results, items, deep_rows, start = [], [], [], 0
    for t, h, w in grid.tolist():
        per = h * w // 4
        groups, rows = [], [[] for _ in deep]
        for g in range(t):
            sl = slice(start + g * per, start + (g + 1) * per)
            res = (compress_reference(merged[None, sl], us[None, sl].float(), budget, keys=uk[None, sl].float(),
                                      has_cls=False) if per > budget else None)
            groups.append(res)
            for i, layer in enumerate(deep):
                if res is None:
                    rows[i].append(layer[sl])
                else:  # the oracle's arithmetic on the deepstack rows, with the oracle's choices
                    from tests.helpers import Case, expected_from_choices

                    case = Case(layer[None, sl], us[None, sl].float(), budget, has_cls=False)
                    rows[i].append(expected_from_choices(case, res)[0])
        items.append(merged[start: start + t * per])
        results.append(groups)
        deep_rows.append([torch.cat(r) for r in rows])
        start += t * per
    return results, items, deep_rows


# --------------------------------------------------------------------------------------------
# Videos and Qwen3-VL
# --------------------------------------------------------------------------------------------

QWEN_VIDEO_PROMPT = "USER: <|vision_start|> <|video_pad|> <|vision_end|> what is this ? ASSISTANT:"
ONEVISION_VIDEO_PROMPT = "USER: <video> what is this ? ASSISTANT:"


def video(seed: int, frames: int, h: int, w: int) -> np.ndarray:
    """(frames, h, w, 3) uint8 random frames."""
    return (np.random.default_rng(seed).random((frames, h, w, 3)) * 255).astype(np.uint8)


class TinyQwenVideoProcessor:
    """Stands in for Qwen2VLVideoProcessor / Qwen3VLVideoProcessor (which need torchvision): no resize,
    so frame sides must be multiples of patch x merge; returns what the processors read:
    pixel_values_videos in the Qwen patch layout, video_grid_thw, and video metadata (fps, frame
    indices: Qwen2.5-VL's second_per_grid_ts, Qwen3-VL's timestamps)."""

    merge_size, temporal_patch_size = 2, 2

    def __init__(self, patch_size: int = 14, fps: float = 2.0, mean: float = 0.5, std: float = 0.5):
        self.patch_size, self.fps, self.mean, self.std = patch_size, fps, mean, std

    def patchify(self, frames: np.ndarray) -> tuple[torch.Tensor, list[int]]:
        x = torch.from_numpy((frames.astype(np.float32) / 255 - self.mean) / self.std).permute(0, 3, 1, 2)
        f, c, h, w = x.shape
        tps, m, p = self.temporal_patch_size, self.merge_size, self.patch_size
        if pad := -f % tps:  # the last frame repeated to a whole temporal patch
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
            f += pad
        t, gh, gw = f // tps, h // p, w // p
        x = x.reshape(t, tps, c, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(t * gh * gw, c * tps * p * p), [t, gh, gw]

    def __call__(self, videos, **kwargs):
        from transformers import BatchFeature
        from transformers.video_utils import VideoMetadata

        videos = videos if isinstance(videos, (list, tuple)) else [videos]
        out = [self.patchify(v) for v in videos]
        # every frame sampled: sampled_fps (Qwen2.5-VL's second_per_grid_ts) is the fps
        meta = [VideoMetadata(total_num_frames=len(v), fps=self.fps, frames_indices=list(range(len(v))))
                for v in videos]
        return BatchFeature({"pixel_values_videos": torch.cat([o[0] for o in out]),
                             "video_grid_thw": torch.tensor([o[1] for o in out]), "video_metadata": meta})


class TinyFramesVideoProcessor:
    """Stands in for LlavaOnevisionVideoProcessor: frames already at the tower's image size ->
    pixel_values_videos (B, F, 3, H, W)."""

    def __call__(self, videos, **kwargs):
        from transformers import BatchFeature

        videos = videos if isinstance(videos, (list, tuple)) else [videos]
        frames = [torch.from_numpy((v.astype(np.float32) / 255 - 0.5) / 0.5).permute(0, 3, 1, 2) for v in videos]
        return BatchFeature({"pixel_values_videos": torch.stack(frames)})


def with_video_processor(built):
    """(model, processor) with the stand-in video processor of its family."""
    model, proc = built
    qwen = "qwen" in model.config.model_type
    patch = getattr(model.config.vision_config, "patch_size", 14)
    proc.video_processor = TinyQwenVideoProcessor(patch) if qwen else TinyFramesVideoProcessor()
    return model, proc


def build_qwen3(seed: int = 0):
    """A tiny Qwen3-VL: 3 vision blocks, deepstack after blocks 0 and 1, interleaved M-RoPE."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = tokenizer("<|image_pad|>", "<|video_pad|>")
    ip = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=64 * 64,
                                  max_pixels=160 * 160, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = no_video_processor(transformers.Qwen3VLProcessor)(image_processor=ip, tokenizer=tok)
    proc.video_processor = TinyQwenVideoProcessor(patch_size=16)
    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=len(tok), max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                 "mrope_interleaved": True})
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    cfg = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                                     video_token_id=VIDEO, vision_start_token_id=6, vision_end_token_id=7)
    torch.manual_seed(seed)
    return transformers.Qwen3VLForConditionalGeneration(cfg).eval(), proc


def deepstack_inputs(model) -> "LMInputs":
    """Records the deepstack features the Qwen3-VL language model receives on each call."""
    return LMInputs(model, keys=("visual_pos_masks", "deepstack_visual_embeds"))


# Fixtures shared by the LLaVA tests of the VisionZip and VisToG integrations (a test module imports
# them by name).
@pytest.fixture(scope="module")
def llava():
    """A tiny random-weight LLaVA-1.5 and its processor (build_llava), one per test module."""
    return build_llava()


@pytest.fixture(scope="module")
def images():
    """Two images of different sizes."""
    return [image(1, 80, 90), image(2, 100, 70)]
