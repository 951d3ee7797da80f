"""Tiny random-weight Hugging Face checkpoints that vLLM can serve (no downloads).

Each writer builds the model from a config, saves it with ``save_pretrained`` together with a
processor whose tokenizer is built locally (WordLevel vocabulary, chat template), and returns the
model (kept in memory for the transformers-side comparisons) and its processor. Sizes: the LLM's
head size is 32 (vLLM's CPU attention takes 32, 64, 80, ...).
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = ("USER: ASSISTANT: USER ASSISTANT What is this ? a cat dog picture the of in describe image . , : "
         "yes no red blue one two three").split()

LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' or c['type'] == 'image_url' %}<image> "
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: {{ m['content'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' or c['type'] == 'image_url' %}"
    "<|vision_start|> <|image_pad|> <|vision_end|> "
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)

LLAVA_PROMPT = "USER: <image> What is this ? ASSISTANT:"
QWEN_PROMPT = ("<|im_start|> user <|vision_start|> <|image_pad|> <|vision_end|> What is this ? <|im_end|> "
               "<|im_start|> assistant")


def tokenizer(specials: list[str], template: str, **special_tokens: str):
    """A whitespace WordLevel tokenizer over ``specials`` + a few words, with a chat template."""
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for word in list(specials) + list(WORDS) + ["assistant", "user"]:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special_tokens)
    fast.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in special_tokens.values()]})
    fast.chat_template = template
    return fast


def _rename_clip_tower(out_dir: str) -> None:
    """transformers >= 5.19 saves the CLIP tower without its ``vision_model`` level; vLLM's
    CLIPVisionModel wants ``vision_tower.vision_model.<...>``."""
    path = os.path.join(out_dir, "model.safetensors")
    state = load_file(path)
    renamed = {}
    for key, value in state.items():
        for prefix in ("model.vision_tower.", "vision_tower."):
            if key.startswith(prefix) and not key[len(prefix):].startswith("vision_model."):
                key = prefix + "vision_model." + key[len(prefix):]
                break
        renamed[key] = value.contiguous()
    save_file(renamed, path, metadata={"format": "pt"})


def _llama(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)


def _clip(image_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=image_size, patch_size=14, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=3, num_attention_heads=4, projection_dim=32)


def _llava_tokenizer():
    return tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], LLAVA_TEMPLATE,
                     unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _llava_like(out_dir: str, kind: str, image_size: int, seed: int, image_processor_kwargs: dict, **config_kwargs):
    """Build, save and return a LLaVA-family model (``kind``: "Llava" or "LlavaNext") and its processor."""
    import transformers

    tok = _llava_tokenizer()
    config = getattr(transformers, f"{kind}Config")(
        vision_config=_clip(image_size), text_config=_llama(len(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", **config_kwargs)
    config.architectures = [f"{kind}ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForConditionalGeneration")(config).eval()
    if kind == "LlavaNext":
        with torch.no_grad():
            model.model.image_newline.normal_()  # zeros at init: make the newline row visible
    model.save_pretrained(out_dir, safe_serialization=True)
    image_processor_cls = transformers.CLIPImageProcessor if kind == "Llava" else transformers.LlavaNextImageProcessor
    image_processor = image_processor_cls(size={"shortest_edge": image_size}, **image_processor_kwargs,
                                          crop_size={"height": image_size, "width": image_size})
    processor = getattr(transformers, f"{kind}Processor")(
        image_processor=image_processor, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    processor.save_pretrained(out_dir)
    _rename_clip_tower(out_dir)
    return model, processor


def llava(out_dir: str, image_size: int = 84, seed: int = 0):
    """LLaVA-1.5: CLIP (image_size px, patch 14, 3 layers, selection layer -2) + a 2-layer Llama."""
    return _llava_like(out_dir, "Llava", image_size, seed, {})


def llava_next(out_dir: str, image_size: int = 42, seed: int = 0):
    """LLaVA-NeXT: CLIP crops of image_size px, pinpoints up to 2 x 2 crops, a 2-layer Llama."""
    pins = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size],
            [2 * image_size, 2 * image_size]]
    return _llava_like(out_dir, "LlavaNext", image_size, seed, {"image_grid_pinpoints": pins},
                       image_grid_pinpoints=pins)


def qwen(out_dir: str, version: str = "2", seed: int = 0):
    """Qwen2-VL ("2": 2 blocks) or Qwen2.5-VL ("2.5": 3 blocks, block 1 full attention, windows of
    2 x 2 merge units, so the window order is exercised); images of 56..168 px a side."""
    import transformers

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = tokenizer(specials, QWEN_TEMPLATE, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    text = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None)
    token_ids = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                     vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if version == "2":
        vision = dict(depth=2, embed_dim=32, hidden_size=128, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **token_ids)
        model_cls, processor_cls = transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLProcessor
        config.architectures = ["Qwen2VLForConditionalGeneration"]
    else:
        vision = dict(depth=3, hidden_size=32, out_hidden_size=128, intermediate_size=64, num_heads=4,
                      fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, in_chans=3)
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids)
        model_cls, processor_cls = transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLProcessor
        config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    pixels = dict(min_pixels=56 * 56, max_pixels=168 * 168, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = processor_cls(image_processor=transformers.Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                              video_processor=transformers.Qwen2VLVideoProcessor(**pixels),
                              chat_template=QWEN_TEMPLATE)
    processor.save_pretrained(out_dir)
    return model, processor
