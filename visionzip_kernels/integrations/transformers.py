"""VisionZip for loaded Hugging Face ``transformers`` vision-language models (issue 7).

    >>> from visionzip_kernels.integrations.transformers import apply_visionzip, remove_visionzip
    >>> handle = apply_visionzip(model, budget=64, processor=processor)   # patches this instance only
    >>> out = model.generate(**processor(images=img, text=prompt, return_tensors="pt"))
    >>> remove_visionzip(model)                                           # exact inverse

What is patched: only the given model *instance* (and processor instance). Methods are replaced by
entries in the instance ``__dict__`` (the class is untouched, so two models in one process are
independent); :func:`remove_visionzip` deletes those entries again. The vision tower keeps its attention
implementation (SDPA, FlashAttention, eager): per call, temporary forward hooks on the selection layer's
projections capture its q / k, and the scores are computed from them without an N x N matrix.

Supported (see ``docs/transformers.md`` for the layouts):

* ``LlavaForConditionalGeneration`` (CLIP, CLS kept): the selection layer is ``vision_feature_layer``;
  the projector receives the k compressed tokens instead of the 576 patches.
* ``LlavaNextForConditionalGeneration`` (anyres): every crop is compressed to k tokens; an image becomes
  [base crop k][sub-crop 1 k]...[sub-crop P-1 k][image_newline].
* ``LlavaOnevisionForConditionalGeneration`` (SigLIP, no CLS, received-attention scores): same layout.
* ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` (no CLS): scores at the
  last full-attention block, averaged with the keys over each 2x2 merge unit, compression of the merger
  output, M-RoPE positions of the kept tokens gathered from the uncompressed layout.

The processor must emit as many image placeholders as the model now produces:
:func:`apply_visionzip_processor` (or ``apply_visionzip(..., processor=...)``) patches its
``replace_image_token``; a patched model fed an unpatched processor's input raises a ``ValueError`` that
says so.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .. import api as _api
from .._validation import default_contextual

try:  # the fused score kernels, when the package has them
    from .. import scores as _scores_module  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the checkout
    _scores_module = None

__all__ = [
    "VisionZipHandle",
    "VisionZipImageOutput",  # noqa: F822 - built lazily by __getattr__ (needs transformers)
    "apply_visionzip",
    "apply_visionzip_processor",
    "remove_visionzip",
    "remove_visionzip_processor",
]

_HANDLE_ATTR = "_visionzip_handle"
_PROCESSOR_ATTR = "_visionzip_processor_state"
_MISSING = object()


# --------------------------------------------------------------------------------------------
# Scores from the selection layer's q / k (SPEC 4): never an N x N matrix for the whole tower
# --------------------------------------------------------------------------------------------


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _plain_cls_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q_cls . K^T * scale) summed over heads: q (B, H, d), k (B, H, N, d) -> (B, N)."""
    acc = _acc_dtype(q)
    logits = torch.einsum("bhd,bhnd->bhn", q.to(acc), k.to(acc)) * scale
    return logits.softmax(dim=-1).sum(dim=1)


def _plain_received_scores(q: torch.Tensor, k: torch.Tensor, scale: float, block: int = 256) -> torch.Tensor:
    """Attention received by each key, summed over heads and queries: (B, H, N, d) -> (B, N).

    Query blocks of ``block`` rows: each block's rows are complete, so its softmax is exact, and only a
    (B, H, block, N) slab exists at a time.
    """
    acc = _acc_dtype(q)
    b, _, n, _ = q.shape
    qf, kt = q.to(acc), k.to(acc).transpose(-1, -2)
    out = torch.zeros(b, n, dtype=acc, device=q.device)
    for start in range(0, n, block):
        probs = (torch.matmul(qf[:, :, start : start + block], kt) * scale).softmax(dim=-1)
        out += probs.sum(dim=(1, 2))
    return out


def cls_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """CLS-row scores, (B, H, d) x (B, H, N, d) -> (B, N); ``visionzip_kernels.scores`` when present."""
    if _scores_module is not None and hasattr(_scores_module, "cls_scores"):
        return _scores_module.cls_scores(q, k, scale=scale)
    return _plain_cls_scores(q, k, scale)


def received_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Received-attention scores, (B, H, N, d) -> (B, N); ``visionzip_kernels.scores`` when present."""
    if _scores_module is not None and hasattr(_scores_module, "received_scores"):
        return _scores_module.received_scores(q, k, scale=scale)
    return _plain_received_scores(q, k, scale)


# --------------------------------------------------------------------------------------------
# Outputs and handle
# --------------------------------------------------------------------------------------------


def _base_output_class() -> type:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling


def _make_output_class() -> type:
    base = _base_output_class()

    @dataclass
    class VisionZipImageOutput(base):  # type: ignore[misc, valid-type]
        """``get_image_features`` output of a patched model.

        pooler_output: per image, the (tokens, C_text) features the LLM receives.
        dominant_indices / contextual_indices / token_map: per image, the :class:`CompressResult`
            indices of the compress call (rows = crops for LLaVA-NeXT / OneVision, 1 row otherwise).
        kept_indices: per image, (k,) int64 index of the token each output row stands for
            (dominant indices, then contextual targets): the row order fed to the LLM.
        grid_thw: Qwen only, the (num_images, 3) grid of the images.
        source_features: Qwen only, the per-image features as produced (the same tensor objects as
            pooler_output until ``generate`` repeats images per beam / returned sequence, which
            rewrites pooler_output only); maps repeated entries back to their indices and grids.
        """

        dominant_indices: Optional[list] = None
        contextual_indices: Optional[list] = None
        token_map: Optional[list] = None
        kept_indices: Optional[list] = None
        grid_thw: Optional[torch.Tensor] = None
        source_features: Optional[tuple] = None

    VisionZipImageOutput.__module__ = __name__
    VisionZipImageOutput.__qualname__ = "VisionZipImageOutput"
    return VisionZipImageOutput


_OUTPUT_CLASS: Optional[type] = None


def _output_class() -> type:
    global _OUTPUT_CLASS
    if _OUTPUT_CLASS is None:
        _OUTPUT_CLASS = _make_output_class()
    return _OUTPUT_CLASS


def __getattr__(name: str) -> Any:
    if name == "VisionZipImageOutput":  # built lazily: needs transformers
        return _output_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class VisionZipHandle:
    """What :func:`apply_visionzip` changed on one model (and optionally its processor).

    Attributes: ``family`` ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"),
    ``budget`` (k tokens per image / crop), ``contextual`` (Cx, None = ``k * 5 // 32``), ``dominant``,
    ``backend``, ``processor`` (the patched processor or None). ``remove()`` undoes everything.
    """

    def __init__(self, model: torch.nn.Module, family: str, budget: int, contextual: int, backend: Optional[str]):
        self.model = model
        self.family = family
        self.budget = budget
        self.contextual = contextual
        self.dominant = budget - contextual
        self.backend = backend
        self.processor: Any = None
        self._patches: list[tuple[Any, str, Any]] = []
        self._removed = False

    def _set(self, obj: Any, name: str, value: Any) -> None:
        """Put ``value`` in ``obj.__dict__[name]``, remembering what was there."""
        self._patches.append((obj, name, obj.__dict__.get(name, _MISSING)))
        obj.__dict__[name] = value

    def compress(self, hidden: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, has_cls: bool, k: Optional[int] = None):
        """One compress call with this handle's settings; k defaults to the budget."""
        k = self.budget if k is None else k
        contextual = self.contextual if k == self.budget else default_contextual(k)
        return _api.compress(
            hidden, scores, k, keys=keys, contextual=contextual, has_cls=has_cls,
            backend=self.backend, return_indices=True,
        )

    def remove(self) -> None:
        """Restore every patched attribute (and the processor) exactly as it was."""
        if self._removed:
            return
        for obj, name, old in reversed(self._patches):
            if old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = old
        self._patches.clear()
        if self.processor is not None:
            remove_visionzip_processor(self.processor)
            self.processor = None
        self._removed = True

    def __repr__(self) -> str:
        return (
            f"VisionZipHandle(family={self.family!r}, budget={self.budget}, dominant={self.dominant}, "
            f"contextual={self.contextual}, backend={self.backend!r}, removed={self._removed})"
        )


# --------------------------------------------------------------------------------------------
# Capturing the selection layer
# --------------------------------------------------------------------------------------------


class _Capture:
    """Temporary forward hooks that store module outputs (and optionally inputs) by name."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self._hooks: list[Any] = []

    def output(self, module: torch.nn.Module, name: str) -> None:
        def hook(_mod, _args, out):
            self.values[name] = out[0] if isinstance(out, (tuple, list)) else out

        self._hooks.append(module.register_forward_hook(hook))

    def inputs(self, module: torch.nn.Module, name: str) -> None:
        def hook(_mod, args, kwargs):
            self.values[name] = (args, kwargs)

        self._hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def __enter__(self) -> "_Capture":
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __getitem__(self, name: str) -> Any:
        if name not in self.values:
            raise RuntimeError(
                f"VisionZip: the vision tower did not run the hooked module ({name}); "
                "this transformers version is not supported"
            )
        return self.values[name]


def _encoder_layers(tower: torch.nn.Module) -> torch.nn.ModuleList:
    """The encoder layer list of a CLIP / SigLIP vision tower."""
    for path in ("encoder.layers", "vision_model.encoder.layers"):
        obj: Any = tower
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise TypeError(f"VisionZip: cannot find the encoder layers of the vision tower {type(tower).__name__}")


def _selection_layer(tower: torch.nn.Module, vision_feature_layer: Any) -> torch.nn.Module:
    """The encoder layer whose output is ``hidden_states[vision_feature_layer]``."""
    if not isinstance(vision_feature_layer, int):
        raise NotImplementedError(
            f"VisionZip supports a single int vision_feature_layer; got {vision_feature_layer!r}"
        )
    layers = _encoder_layers(tower)
    n = len(layers)
    idx = vision_feature_layer if vision_feature_layer >= 0 else n + 1 + vision_feature_layer
    if not 1 <= idx <= n:
        raise ValueError(
            f"VisionZip needs vision_feature_layer to select an encoder layer output (1..{n} or -{n}..-1); "
            f"got {vision_feature_layer}"
        )
    return layers[idx - 1]


def _heads(q: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, H*d) -> (B, H, N, d)."""
    b, n, c = q.shape
    return q.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def _run_clip_like_tower(
    tower: torch.nn.Module, pixel_values: torch.Tensor, layer: torch.nn.Module, has_cls: bool, **kwargs: Any
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run a CLIP / SigLIP tower, capturing the selection layer. Returns (tower output, hidden (B, N, C),
    scores (B, N) float32, keys (B, N, d) float32 averaged over heads)."""
    attn = layer.self_attn
    with _Capture() as cap:
        cap.output(attn.q_proj, "q")
        cap.output(attn.k_proj, "k")
        cap.output(layer, "hidden")
        out = tower(pixel_values, return_dict=True, **kwargs)
    hidden = cap["hidden"]
    q, k = _heads(cap["q"], attn.num_heads), _heads(cap["k"], attn.num_heads)
    scores = cls_scores(q[:, :, 0], k, attn.scale) if has_cls else received_scores(q, k, attn.scale)
    keys = k.to(_acc_dtype(k)).mean(dim=1)
    return out, hidden, scores, keys


def _kept_indices(result: Any) -> torch.Tensor:
    """(B, k) token index each output row stands for: dominant rows then contextual targets."""
    return torch.cat([result.dominant_indices, result.contextual_indices], dim=1)


# --------------------------------------------------------------------------------------------
# Placeholder count check (patched get_placeholder_mask)
# --------------------------------------------------------------------------------------------


def _count_image_tokens(base: torch.nn.Module, input_ids: Optional[torch.Tensor], inputs_embeds: torch.Tensor) -> int:
    token_id = base.config.image_token_id
    if input_ids is not None:
        return int((input_ids == token_id).sum())
    ref = base.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
    return int((inputs_embeds == ref).all(-1).sum())


def _processor_hint(budget: int) -> str:
    return (
        "The processor that built these inputs was not patched for VisionZip: use "
        f"apply_visionzip_processor(processor, budget={budget}) or "
        f"apply_visionzip(model, budget={budget}, processor=processor)."
    )


def _patch_placeholder_check(handle: VisionZipHandle, base: torch.nn.Module, per_image: str) -> None:
    original = base.get_placeholder_mask

    def get_placeholder_mask(input_ids=None, inputs_embeds=None, image_features=None, **kwargs):
        if image_features is not None:
            n_tokens = _count_image_tokens(base, input_ids, inputs_embeds)
            n_rows = image_features.numel() // inputs_embeds.shape[-1]
            if n_tokens != n_rows:
                raise ValueError(
                    f"VisionZip: the input has {n_tokens} image placeholder tokens but the compressed image "
                    f"features have {n_rows} rows ({per_image}). " + _processor_hint(handle.budget)
                )
        return original(input_ids, inputs_embeds=inputs_embeds, image_features=image_features, **kwargs)

    handle._set(base, "get_placeholder_mask", get_placeholder_mask)


# --------------------------------------------------------------------------------------------
# LLaVA-1.5
# --------------------------------------------------------------------------------------------


def _patch_llava(handle: VisionZipHandle, base: torch.nn.Module) -> None:
    tower, projector, config = base.vision_tower, base.multi_modal_projector, base.config
    _selection_layer(tower, config.vision_feature_layer)  # fail at apply time on unsupported configs
    output_cls = _output_class()

    def get_image_features(
        pixel_values: torch.Tensor,
        vision_feature_layer: Any = None,
        vision_feature_select_strategy: Optional[str] = None,
        image_sizes: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ):
        """VisionZip replacement of ``LlavaModel.get_image_features``: (B, 3, H, W) pixels -> per image
        (budget, C_text) features. The CLS token is kept (inside the dominant budget) whatever
        ``vision_feature_select_strategy`` says, as in the method."""
        if image_sizes is not None:
            raise NotImplementedError("VisionZip: LLaVA with image_sizes (Pixtral-style towers) is not supported")
        layer_index = config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        layer = _selection_layer(tower, layer_index)
        kwargs.pop("return_dict", None)
        out, hidden, scores, keys = _run_clip_like_tower(tower, pixel_values, layer, has_cls=True, **kwargs)
        result = handle.compress(hidden, scores, keys, has_cls=True)
        features = projector(result.output)
        kept = _kept_indices(result)
        return output_cls(
            last_hidden_state=out.last_hidden_state,
            pooler_output=list(features),
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            dominant_indices=list(result.dominant_indices.unbind(0)),
            contextual_indices=list(result.contextual_indices.unbind(0)),
            token_map=list(result.token_map.unbind(0)),
            kept_indices=list(kept.unbind(0)),
        )

    handle._set(base, "get_image_features", get_image_features)
    _patch_placeholder_check(handle, base, f"{handle.budget} per image")


# --------------------------------------------------------------------------------------------
# LLaVA-NeXT and LLaVA-OneVision (anyres crops)
# --------------------------------------------------------------------------------------------


def _patch_anyres(handle: VisionZipHandle, base: torch.nn.Module, onevision: bool) -> None:
    """Every crop (base image first, then the sub-crops in processor order) is compressed to k tokens;
    an image becomes [crop 0: k rows][crop 1: k rows]...[crop P-1: k rows][image_newline]. The unpad /
    per-row newline layout of the original needs a full grid, which compressed tokens no longer form;
    the single trailing newline keeps the end-of-image marker the model was trained with."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    tower, projector, config = base.vision_tower, base.multi_modal_projector, base.config
    _selection_layer(tower, config.vision_feature_layer)
    # CLIP towers (LLaVA-NeXT) have a CLS token; SigLIP (OneVision) does not.
    has_cls = getattr(tower.embeddings, "class_embedding", None) is not None
    output_cls = _output_class()

    def encode(pixel_values, image_sizes, vision_feature_layer, need_crops, kwargs):
        crops = [
            image_size_to_num_patches(
                image_size=size, grid_pinpoints=config.image_grid_pinpoints, patch_size=config.vision_config.image_size
            )
            if crop
            else 1
            for size, crop in zip(image_sizes, need_crops)
        ]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pix[:n] for pix, n in zip(pixel_values, crops)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected 4 or 5 dimensions")
        layer = _selection_layer(tower, config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer)
        kwargs.pop("return_dict", None)
        out, hidden, scores, keys = _run_clip_like_tower(tower, pixel_values, layer, has_cls=has_cls, **kwargs)
        result = handle.compress(hidden, scores, keys, has_cls=has_cls)  # one row per crop
        projected = projector(result.output)
        newline = base.image_newline[None].to(projected)
        features, split = [], 0
        for n in crops:
            features.append(torch.cat([projected[split : split + n].flatten(0, 1), newline], dim=0))
            split += n
        kept = _kept_indices(result)
        per_image = lambda t: list(t.split(crops))  # noqa: E731
        return output_cls(
            last_hidden_state=out.last_hidden_state,
            pooler_output=features,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            dominant_indices=per_image(result.dominant_indices),
            contextual_indices=per_image(result.contextual_indices),
            token_map=per_image(result.token_map),
            kept_indices=per_image(kept),
        )

    if onevision:

        def get_image_features(
            pixel_values: torch.Tensor,
            image_sizes: torch.Tensor,
            vision_feature_layer: Any = None,
            vision_feature_select_strategy: Optional[str] = None,
            vision_aspect_ratio: Optional[str] = None,
            batch_num_images: Optional[torch.Tensor] = None,
            **kwargs: Any,
        ):
            """VisionZip replacement of ``LlavaOnevisionModel.get_image_features``: per image
            crops * budget + 1 rows (multi-image samples use the base crop only, as the model does)."""
            if batch_num_images is None:
                need = [True] * len(image_sizes)
            else:
                need = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
            return encode(pixel_values, image_sizes, vision_feature_layer, need, kwargs)

    else:

        def get_image_features(
            pixel_values: torch.Tensor,
            image_sizes: torch.Tensor,
            vision_feature_layer: Any = None,
            vision_feature_select_strategy: Optional[str] = None,
            **kwargs: Any,
        ):
            """VisionZip replacement of ``LlavaNextModel.get_image_features``: per image
            crops * budget + 1 rows."""
            return encode(pixel_values, image_sizes, vision_feature_layer, [True] * len(image_sizes), kwargs)

    handle._set(base, "get_image_features", get_image_features)
    _patch_placeholder_check(handle, base, f"crops x {handle.budget} + 1 newline per image")


# --------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL
# --------------------------------------------------------------------------------------------


def _qwen_selection_block(visual: torch.nn.Module) -> int:
    """Index of the block scored: the last full-attention block (Qwen2.5-VL windows the others)."""
    full = getattr(visual, "fullatt_block_indexes", None)
    return int(full[-1]) if full else len(visual.blocks) - 1


def _qwen_unit_scores_and_keys(
    visual: torch.nn.Module, block_index: int, cap: _Capture, grid_thw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per merge unit (raster order, all images concatenated): received-attention score (U,) and key
    averaged over heads and over the unit's patches (U, d), from the captured selection block."""
    attn = visual.blocks[block_index].attn
    qkv = cap["qkv"]
    args, kwargs = cap["attn_in"]
    cu_seqlens = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
    cos, sin = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)
    seq = qkv.shape[0]
    q, k, _ = qkv.reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (S, H, d)
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    q_rot, k_rot = rotate(q, k, cos, sin)  # scores see the attention the block computes (RoPE'd)
    acc = _acc_dtype(q)
    scores = torch.empty(seq, dtype=acc, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            qi = q_rot[start:end].transpose(0, 1).unsqueeze(0)
            ki = k_rot[start:end].transpose(0, 1).unsqueeze(0)
            scores[start:end] = received_scores(qi, ki, attn.scaling)[0].to(acc)
    unit = visual.spatial_merge_size**2
    # Keys for the cosine metric: projections without RoPE (a rotation would make similarity positional).
    keys = k.to(acc).mean(dim=1)
    unit_scores = scores.view(-1, unit).mean(dim=1)
    unit_keys = keys.view(-1, unit, keys.shape[-1]).mean(dim=1)
    if getattr(visual, "fullatt_block_indexes", None) is not None:  # Qwen2.5-VL: undo the window order
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        reverse = torch.argsort(window_index.to(unit_scores.device))
        unit_scores, unit_keys = unit_scores[reverse], unit_keys[reverse]
    return unit_scores, unit_keys


def _image_runs(types_row: torch.Tensor, valid_row: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of the runs of image tokens (type 1) among valid tokens of one row."""
    is_img = ((types_row == 1) & valid_row).to(torch.int8)
    edges = torch.diff(is_img, prepend=is_img.new_zeros(1), append=is_img.new_zeros(1))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


def _qwen_rope_index(
    base: torch.nn.Module,
    original: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    image_grid_thw: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    kept: Optional[list],
    budget: int,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids of a sequence whose image runs hold compressed tokens.

    Each image run is expanded back to the image's full merged-token count, the model's own
    ``get_rope_index`` runs on that layout, and each compressed token takes the position of the token
    it stands for (``kept[i][r]``: dominant token, or its contextual target). Text after an image keeps
    the position it has without compression. Without ``kept`` (positions wanted before the image is
    encoded, e.g. by ``generate``) the first tokens of the image stand in; the patched forward
    recomputes the image positions once the kept indices are known.
    """
    if image_grid_thw is None:
        return original(input_ids, mm_token_type_ids=mm_token_type_ids, attention_mask=attention_mask, **kwargs)
    merge = base.config.vision_config.spatial_merge_size
    units = (image_grid_thw.prod(-1) // merge**2).tolist()
    batch, length = input_ids.shape
    device = input_ids.device
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    rows, index_maps = [], []
    image = 0
    for b in range(batch):
        pieces_ids, pieces_types, pieces_valid, index_map = [], [], [], []
        cursor, expanded = 0, 0
        for start, end in _image_runs(mm_token_type_ids[b], valid[b]):
            run, full = end - start, units[image]
            if run > full:
                raise ValueError(
                    f"VisionZip: image {image} has {run} placeholder tokens but only {full} tokens. "
                    + _processor_hint(budget)
                )
            order = kept[image].to(device) if kept is not None else torch.arange(run, device=device)
            if order.numel() != run:
                raise ValueError(
                    f"VisionZip: image {image} has {run} placeholder tokens but {order.numel()} compressed "
                    f"tokens (min({budget}, {full})). " + _processor_hint(budget)
                )
            text = start - cursor
            pieces_ids += [input_ids[b, cursor:start], input_ids.new_full((full,), int(input_ids[b, start]))]
            pieces_types += [mm_token_type_ids[b, cursor:start], mm_token_type_ids.new_ones(full)]
            pieces_valid += [valid[b, cursor:start], valid.new_ones(full)]
            index_map += [torch.arange(text, device=device) + expanded, order + expanded + text]
            expanded += text + full
            cursor = end
            image += 1
        tail = length - cursor
        pieces_ids.append(input_ids[b, cursor:])
        pieces_types.append(mm_token_type_ids[b, cursor:])
        pieces_valid.append(valid[b, cursor:])
        index_map.append(torch.arange(tail, device=device) + expanded)
        rows.append((torch.cat(pieces_ids), torch.cat(pieces_types), torch.cat(pieces_valid)))
        index_maps.append(torch.cat(index_map))
    width = max(r[0].numel() for r in rows)
    ids = input_ids.new_zeros(batch, width)
    types = mm_token_type_ids.new_zeros(batch, width)
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)
    for b, (r_ids, r_types, r_valid) in enumerate(rows):
        ids[b, : r_ids.numel()], types[b, : r_ids.numel()], mask[b, : r_ids.numel()] = r_ids, r_types, r_valid
    positions, _ = original(
        ids, mm_token_type_ids=types, image_grid_thw=image_grid_thw, attention_mask=mask, **kwargs
    )
    gather = torch.stack(index_maps).to(positions.device)
    positions = positions.gather(2, gather.unsqueeze(0).expand(positions.shape[0], -1, -1))
    valid_p = valid.to(positions.device)
    top = positions.masked_fill(~valid_p.unsqueeze(0), -1).amax(dim=(0, 2))
    deltas = (top + 1 - valid_p.sum(dim=1)).unsqueeze(1)
    return positions, deltas


def _qwen_kept_per_entry(image_out: Any) -> tuple[Optional[list], Optional[torch.Tensor]]:
    """Kept indices and grid rows for each entry of ``image_out.pooler_output``.

    ``generate`` encodes the images once and, for beams or several returned sequences, repeats the
    entries of pooler_output per text sample (``_expand_multimodal_outputs``) without touching the
    other fields; the entries stay the same tensor objects, which maps them back to their images."""
    kept = getattr(image_out, "kept_indices", None)
    source = getattr(image_out, "source_features", None)
    if kept is None or source is None:
        return kept, getattr(image_out, "grid_thw", None)
    entries = list(image_out.pooler_output)
    if len(entries) == len(source) and all(a is b for a, b in zip(entries, source)):
        return kept, image_out.grid_thw
    index = {id(f): i for i, f in enumerate(source)}
    try:
        order = [index[id(f)] for f in entries]
    except KeyError:
        raise ValueError(
            "VisionZip: the image features given to the Qwen forward are not those get_image_features "
            "returned (or repeats of them); pass pixel_values, or the unmodified image output"
        ) from None
    return [kept[i] for i in order], image_out.grid_thw[torch.tensor(order, device=image_out.grid_thw.device)]


def _patch_qwen(handle: VisionZipHandle, base: torch.nn.Module) -> None:
    visual = base.visual
    block_index = _qwen_selection_block(visual)
    merge_unit = visual.spatial_merge_size**2
    output_cls = _output_class()
    original_rope_index = base.get_rope_index
    original_forward = base.forward

    def get_image_features(pixel_values: torch.Tensor, image_grid_thw: Optional[torch.LongTensor] = None, **kwargs: Any):
        """VisionZip replacement of ``get_image_features``: per image min(budget, merged tokens) rows."""
        if image_grid_thw is None:
            raise ValueError("VisionZip: Qwen get_image_features needs image_grid_thw")
        kwargs.pop("return_dict", None)
        pixel_values = pixel_values.type(visual.dtype)
        block = visual.blocks[block_index]
        with _Capture() as cap:
            cap.output(block.attn.qkv, "qkv")
            cap.inputs(block.attn, "attn_in")
            out = visual(pixel_values, grid_thw=image_grid_thw, **kwargs)
        unit_scores, unit_keys = _qwen_unit_scores_and_keys(visual, block_index, cap, image_grid_thw)
        sizes = (image_grid_thw.prod(-1) // merge_unit).tolist()
        merged = out.pooler_output
        features, kept, dominant, contextual, token_maps = [], [], [], [], []
        for hidden, scores, keys in zip(
            merged.split(sizes), unit_scores.split(sizes), unit_keys.split(sizes)
        ):
            n = hidden.shape[0]
            if n <= handle.budget:  # nothing to drop: the image keeps all its tokens, in order
                idx = torch.arange(n, device=hidden.device)
                features.append(hidden)
                kept.append(idx)
                dominant.append(idx)
                contextual.append(idx[:0])
                token_maps.append(idx)
                continue
            result = handle.compress(hidden[None], scores[None], keys[None], has_cls=False)
            features.append(result.output[0])
            kept.append(_kept_indices(result)[0])
            dominant.append(result.dominant_indices[0])
            contextual.append(result.contextual_indices[0])
            token_maps.append(result.token_map[0])
        return output_cls(
            last_hidden_state=out.last_hidden_state,
            pooler_output=tuple(features),
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            dominant_indices=dominant,
            contextual_indices=contextual,
            token_map=token_maps,
            kept_indices=kept,
            grid_thw=image_grid_thw,
            source_features=tuple(features),
        )

    def get_rope_index(input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                       attention_mask=None, visionzip_kept=None, **kwargs):
        """Compression-aware ``get_rope_index`` (see :func:`_qwen_rope_index`)."""
        kwargs = {k: v for k, v in kwargs.items() if k in ("second_per_grid_ts",)}
        return _qwen_rope_index(
            base, original_rope_index, input_ids, mm_token_type_ids, image_grid_thw, attention_mask,
            visionzip_kept, handle.budget, video_grid_thw=video_grid_thw, **kwargs,
        )

    def forward(input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                pixel_values=None, image_grid_thw=None, mm_token_type_ids=None, mm_encoder_outputs=None, **kwargs):
        """Encode images first (compressed) and place their features at the placeholders, then give
        those tokens the positions of the tokens they stand for, then run the original forward.

        The features are scattered here rather than handed on as ``mm_encoder_outputs``: transformers
        before 5.18 has no such argument (and would silently drop it), every 5.x accepts
        ``inputs_embeds`` together with ``input_ids``."""
        mm_encoder_outputs = dict(mm_encoder_outputs or {})
        image_out = mm_encoder_outputs.pop("image", None)
        if isinstance(image_out, output_cls) and image_out.kept_indices is None:
            # generate's chunked prefill slices the encoded features per chunk and drops the other
            # fields: the compressed tokens' positions (which need the kept indices) would be guesses
            raise NotImplementedError(
                "VisionZip (Qwen): chunked prefill (prefill_chunk_size) with images is not supported; the "
                "positions of the compressed image tokens need the whole prompt. Generate without it."
            )
        if pixel_values is not None and image_out is None:
            image_out = base.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        pixel_values = None
        if image_out is not None:
            if inputs_embeds is None:
                inputs_embeds = base.get_input_embeddings()(input_ids)
            image_embeds = torch.cat(tuple(image_out.pooler_output), dim=0)
            image_embeds = image_embeds.to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask, _ = base.get_placeholder_mask(
                input_ids, inputs_embeds=inputs_embeds, image_features=image_embeds
            )
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_embeds)
        if mm_encoder_outputs:  # videos: left to the model (uncompressed)
            kwargs["mm_encoder_outputs"] = mm_encoder_outputs
        kept, grid = _qwen_kept_per_entry(image_out)
        cached = past_key_values.get_seq_length() if past_key_values is not None else 0
        if kept is not None and input_ids is not None and mm_token_type_ids is not None and cached == 0:
            extra = {k: kwargs[k] for k in ("second_per_grid_ts",) if kwargs.get(k) is not None}
            positions, deltas = _qwen_rope_index(
                base, original_rope_index, input_ids, mm_token_type_ids, grid, attention_mask,
                kept, handle.budget, video_grid_thw=kwargs.get("video_grid_thw"), **extra,
            )
            if position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] == 4:
                positions = torch.cat([position_ids[:1], positions.to(position_ids)], dim=0)  # keep text row
            position_ids = positions
            base.rope_deltas = deltas
        return original_forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, pixel_values=pixel_values,
            image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids, **kwargs,
        )

    handle._set(base, "get_image_features", get_image_features)
    handle._set(base, "get_rope_index", get_rope_index)
    handle._set(base, "forward", forward)
    _patch_placeholder_check(handle, base, f"min({handle.budget}, merged tokens) per image")


# --------------------------------------------------------------------------------------------
# Processors
# --------------------------------------------------------------------------------------------


@dataclass
class _ProcessorState:
    budget: int
    family: str
    old: dict


def _processor_family(processor: Any) -> str:
    names = [c.__name__ for c in type(processor).__mro__]
    for cls_name, family in (
        ("LlavaNextProcessor", "llava_next"),
        ("LlavaOnevisionProcessor", "llava_onevision"),
        ("Qwen2_5_VLProcessor", "qwen2_vl"),
        ("Qwen2VLProcessor", "qwen2_vl"),
        ("LlavaProcessor", "llava"),
    ):
        if cls_name in names:
            return family
    raise TypeError(
        f"VisionZip: unsupported processor {type(processor).__name__}; supported: LlavaProcessor, "
        "LlavaNextProcessor, LlavaOnevisionProcessor, Qwen2VLProcessor, Qwen2_5_VLProcessor"
    )


def _num_crops(processor: Any, image_inputs: dict, image_idx: int) -> int:
    """Crops (base + sub-crops) the LLaVA-NeXT / OneVision model will see for one image."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    size = image_inputs["image_sizes"][image_idx]
    size = size.tolist() if hasattr(size, "tolist") else list(size)
    crop = image_inputs["pixel_values"][0][0].shape[-1]
    return int(
        image_size_to_num_patches(
            image_size=size, grid_pinpoints=processor.image_processor.image_grid_pinpoints, patch_size=crop
        )
    )


def _onevision_multi_image(image_inputs: dict, image_idx: int) -> bool:
    """Whether image ``image_idx`` belongs to a sample with several images (OneVision's rule)."""
    seen = 0
    for n in image_inputs.get("batch_num_images", []):
        if image_idx < seen + n:
            return n != 1
        seen += n
    return False


def qwen_image_tokens(budget: int, units: int) -> int:
    """Tokens a Qwen2-VL / 2.5-VL image of ``units`` merged tokens keeps: min(budget, units)."""
    return min(budget, units)


def apply_visionzip_processor(processor: Any, budget: int = 64) -> Any:
    """Make ``processor`` expand each image placeholder to the VisionZip token count (in place).

    LLaVA: ``budget`` per image. LLaVA-NeXT / OneVision: ``crops * budget + 1`` (the +1 is the single
    image_newline, see docs/transformers.md). Qwen2-VL / 2.5-VL: ``min(budget, merged tokens)``.
    Returns the processor; :func:`remove_visionzip_processor` undoes it.
    """
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int; got {budget!r}")
    family = _processor_family(processor)
    if _PROCESSOR_ATTR in processor.__dict__:
        raise RuntimeError("VisionZip is already applied to this processor; call remove_visionzip_processor first")

    def replace_image_token(image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        if family == "llava":
            count = budget
        elif family == "llava_onevision" and _onevision_multi_image(image_inputs, image_idx):
            count = budget + 1  # multi-image samples: base crop only
        elif family in ("llava_next", "llava_onevision"):
            count = _num_crops(processor, image_inputs, image_idx) * budget + 1
        else:
            grid = image_inputs["image_grid_thw"][image_idx]
            count = qwen_image_tokens(budget, int(grid.prod()) // processor.image_processor.merge_size**2)
        return processor.image_token * count

    old = {name: processor.__dict__.get(name, _MISSING) for name in ("replace_image_token",)}
    processor.__dict__["replace_image_token"] = replace_image_token
    processor.__dict__[_PROCESSOR_ATTR] = _ProcessorState(budget, family, old)
    return processor


def remove_visionzip_processor(processor: Any) -> Any:
    """Undo :func:`apply_visionzip_processor` (no-op on an unpatched processor)."""
    state = processor.__dict__.pop(_PROCESSOR_ATTR, None)
    if state is None:
        return processor
    for name, old in state.old.items():
        if old is _MISSING:
            processor.__dict__.pop(name, None)
        else:
            processor.__dict__[name] = old
    return processor


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _family(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """(family, base model holding get_image_features) of a supported model or base model."""
    candidates = [model] + ([model.model] if isinstance(getattr(model, "model", None), torch.nn.Module) else [])
    for obj in candidates:
        names = [c.__name__ for c in type(obj).__mro__]
        for cls_name, family in (
            ("LlavaNextModel", "llava_next"),
            ("LlavaOnevisionModel", "llava_onevision"),
            ("Qwen2_5_VLModel", "qwen2_5_vl"),
            ("Qwen2VLModel", "qwen2_vl"),
            ("LlavaModel", "llava"),
        ):
            if cls_name in names:
                return family, obj
    raise TypeError(
        f"VisionZip: unsupported model {type(model).__name__}; supported: LlavaForConditionalGeneration, "
        "LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration, "
        "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration (or their base models)"
    )


def _resolve_split(budget: int, dominant: Optional[int], contextual: Optional[int]) -> int:
    """Cx for a budget, from the optional dominant / contextual arguments."""
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int; got {budget!r}")
    if dominant is not None and contextual is not None and dominant + contextual != budget:
        raise ValueError(
            f"dominant + contextual must equal budget; got dominant={dominant}, contextual={contextual}, "
            f"budget={budget}"
        )
    if contextual is None:
        contextual = budget - dominant if dominant is not None else default_contextual(budget)
    if not 0 <= contextual < budget:
        raise ValueError(
            f"need 0 <= contextual < budget (at least one dominant token); got contextual={contextual}, "
            f"budget={budget}"
        )
    return contextual


def apply_visionzip(
    model: torch.nn.Module,
    *,
    budget: int = 64,
    dominant: Optional[int] = None,
    contextual: Optional[int] = None,
    backend: Optional[str] = None,
    processor: Any = None,
) -> VisionZipHandle:
    """Patch one loaded model instance so that its LLM receives ``budget`` visual tokens per image.

    Args:
        model: a supported ``...ForConditionalGeneration`` (or its base ``...Model``), already loaded.
        budget: k, tokens kept per image (per crop for LLaVA-NeXT / OneVision).
        dominant / contextual: the split of k (D + Cx = k); default Cx = k * 5 // 32.
        backend: compress backend (see :func:`visionzip_kernels.compress`), None = fastest available.
        processor: optional processor to patch as well (see :func:`apply_visionzip_processor`);
            :meth:`VisionZipHandle.remove` / :func:`remove_visionzip` restore it too.

    Returns:
        A :class:`VisionZipHandle`; ``remove_visionzip(model)`` or ``handle.remove()`` undoes the patch.
    """
    if _HANDLE_ATTR in model.__dict__:
        raise RuntimeError("VisionZip is already applied to this model; call remove_visionzip(model) first")
    if backend is not None and backend not in _api.BACKENDS:
        raise ValueError(f"backend must be one of {_api.BACKENDS} or None; got {backend!r}")
    cx = _resolve_split(budget, dominant, contextual)
    family, base = _family(model)
    handle = VisionZipHandle(model, family, budget, cx, backend)
    try:
        _PATCHERS[family](handle, base)
        if processor is not None:
            if _processor_family(processor) != ("qwen2_vl" if family.startswith("qwen") else family):
                raise TypeError(
                    f"VisionZip: processor {type(processor).__name__} does not match model family {family}"
                )
            apply_visionzip_processor(processor, budget=budget)
            handle.processor = processor
    except BaseException:
        handle.remove()
        raise
    handle._set(model, _HANDLE_ATTR, handle)
    return handle


def remove_visionzip(model: torch.nn.Module) -> None:
    """Undo :func:`apply_visionzip` on ``model`` exactly (raises if it is not patched)."""
    handle = model.__dict__.get(_HANDLE_ATTR)
    if handle is None:
        raise ValueError("VisionZip is not applied to this model")
    handle.remove()


_PATCHERS: dict[str, Callable[[VisionZipHandle, torch.nn.Module], None]] = {
    "llava": _patch_llava,
    "llava_next": lambda handle, base: _patch_anyres(handle, base, onevision=False),
    "llava_onevision": lambda handle, base: _patch_anyres(handle, base, onevision=True),
    "qwen2_vl": _patch_qwen,
    "qwen2_5_vl": _patch_qwen,
}
