"""Qwen2-VL and Qwen2.5-VL (``model_type`` "qwen2_vl", "qwen2_5_vl"; no CLS), images and videos:
scores at the last full-attention block of the vision tower (Qwen2.5-VL windows the others), from the
RoPE-rotated q / k the block attends with, per image or frame group (``cu_seqlens``); keys are the
un-rotated projections (a rotation would make similarity positional). Scores and keys are averaged
over each 2x2 merge unit (Qwen2.5-VL's window order undone with the model's own ``window_index``);
the reducer runs on the merger output, once per image and once per temporal group of a video (frames
are the batch). Every reduced token takes the M-RoPE position (t, h, w) of the token it stands for;
text after an image or video keeps the position it has without reduction. ``patch`` also serves
Qwen3-VL (``qwen3_vl.py``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..core import Reducer, Selection, expand_runs, merged_unit_selection
from ._compat import HAS_MM_ENCODER_OUTPUTS
from ._core import Capture, Family, Handle, output_class, patch_placeholder_check, register_family


def selection_block(visual: torch.nn.Module) -> int:
    """Index of the block scored: the last full-attention block (Qwen2.5-VL windows the others)."""
    full = getattr(visual, "fullatt_block_indexes", None)
    return int(full[-1]) if full else len(visual.blocks) - 1


def unit_scores_and_keys(
    visual: torch.nn.Module, block_index: int, cap: Capture, grid_thw: torch.Tensor
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
    order = None
    if getattr(visual, "fullatt_block_indexes", None) is not None:  # Qwen2.5-VL: undo the window order
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        order = torch.argsort(window_index.to(qkv.device))
    # Packed images attend within themselves (cu_seqlens); keys without RoPE for the cosine metric.
    return merged_unit_selection(q_rot, k_rot, k, attn.scaling, cu_seqlens, visual.spatial_merge_size**2, order)


def modality_runs(types_row: torch.Tensor, valid_row: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start, end, type) of the runs of image (type 1) and video (type 2) tokens among the valid
    tokens of one row, in order."""
    types = torch.where(valid_row, types_row, torch.zeros_like(types_row)).to(torch.int64)
    change = torch.ones_like(types, dtype=torch.bool)
    change[1:] = types[1:] != types[:-1]
    starts = change.nonzero().flatten().tolist() + [types.numel()]
    return [(a, b, int(types[a])) for a, b in zip(starts[:-1], starts[1:]) if int(types[a]) in (1, 2)]


@dataclass
class RunSpec:
    """One run of placeholders as the uncompressed model lays it out: its full token count and the
    token (of the full run) each compressed placeholder stands for (None: the first ones stand in)."""

    full: int
    kept: Optional[torch.Tensor]


def run_specs(
    grids: Optional[torch.Tensor], kept: Optional[list], merge: int, frame_runs: bool
) -> list[RunSpec]:
    """The runs of one modality, in order: one per image or video, or (``frame_runs``, Qwen3-VL's
    videos) one per temporal group, each with the kept tokens of that group."""
    if grids is None:
        return []
    specs = []
    for i, (t, h, w) in enumerate(grids.tolist()):
        per_group = h * w // merge**2
        item_kept = kept[i] if kept is not None else None
        if not frame_runs:
            specs.append(RunSpec(t * per_group, item_kept))
            continue
        for g in range(t):  # kept indices of an item are ordered group by group
            group_kept = None
            if item_kept is not None:
                sel = (item_kept >= g * per_group) & (item_kept < (g + 1) * per_group)
                group_kept = item_kept[sel] - g * per_group
            specs.append(RunSpec(per_group, group_kept))
    return specs


def rope_index(
    original: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    specs: dict[int, list[RunSpec]],
    hint: str,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids of a sequence whose image / video runs hold reduced tokens.

    Each run (``specs[type]``, consumed in order) is expanded back to its full token count, the
    model's own ``get_rope_index`` runs on that layout (``kwargs``: its grids and e.g.
    ``second_per_grid_ts``), and each reduced token takes the position of the token it stands for
    (for VisionZip a dominant token, or a contextual target), its time component included. Text
    after a run keeps the position it has without reduction.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    queues = {kind: list(v) for kind, v in specs.items()}
    names = {1: "image", 2: "video"}
    rows, index_maps = [], []
    for b in range(batch):
        pieces_ids, pieces_types, pieces_valid, runs, fulls, orders = [], [], [], [], [], []
        cursor = 0
        for start, end, kind in modality_runs(mm_token_type_ids[b], valid[b]):
            if not queues.get(kind):
                raise ValueError(f"VisionZip: more {names[kind]} placeholder runs in the prompt than {names[kind]}s")
            spec = queues[kind].pop(0)
            run = end - start
            order = spec.kept.to(device) if spec.kept is not None else torch.arange(run, device=device)
            if run > spec.full or order.numel() != run:
                raise ValueError(
                    f"VisionZip: a {names[kind]} run has {run} placeholder tokens but its features have "
                    f"{order.numel()} reduced rows (of {spec.full}). " + hint
                )
            pieces_ids += [input_ids[b, cursor:start], input_ids.new_full((spec.full,), int(input_ids[b, start]))]
            pieces_types += [mm_token_type_ids[b, cursor:start], mm_token_type_ids.new_full((spec.full,), kind)]
            pieces_valid += [valid[b, cursor:start], valid.new_ones(spec.full)]
            runs.append((start, end))
            fulls.append(spec.full)
            orders.append(order)
            cursor = end
        pieces_ids.append(input_ids[b, cursor:])
        pieces_types.append(mm_token_type_ids[b, cursor:])
        pieces_valid.append(valid[b, cursor:])
        rows.append((torch.cat(pieces_ids), torch.cat(pieces_types), torch.cat(pieces_valid)))
        index_maps.append(expand_runs(length, runs, fulls, orders).to(device))
    width = max(r[0].numel() for r in rows)
    ids = input_ids.new_zeros(batch, width)
    types = mm_token_type_ids.new_zeros(batch, width)
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)
    for b, (r_ids, r_types, r_valid) in enumerate(rows):
        ids[b, : r_ids.numel()], types[b, : r_ids.numel()], mask[b, : r_ids.numel()] = r_ids, r_types, r_valid
    positions, _ = original(ids, mm_token_type_ids=types, attention_mask=mask, **kwargs)
    gather = torch.stack(index_maps).to(positions.device)
    positions = positions.gather(2, gather.unsqueeze(0).expand(positions.shape[0], -1, -1))
    valid_p = valid.to(positions.device)
    top = positions.masked_fill(~valid_p.unsqueeze(0), -1).amax(dim=(0, 2))
    deltas = (top + 1 - valid_p.sum(dim=1)).unsqueeze(1)
    return positions, deltas


def kept_per_entry(out: Any, kind: str) -> tuple[Optional[list], Optional[torch.Tensor]]:
    """Kept indices and grid rows for each entry of ``out.pooler_output`` (images or videos).

    ``generate`` encodes the images once and, for beams or several returned sequences, repeats the
    entries of pooler_output per text sample (``_expand_multimodal_outputs``) without touching the
    other fields; the entries stay the same tensor objects, which maps them back to their items."""
    kept = getattr(out, "kept_indices", None)
    source = getattr(out, "source_features", None)
    if kept is None or source is None:
        return kept, getattr(out, "grid_thw", None)
    entries = list(out.pooler_output)
    if len(entries) == len(source) and all(a is b for a, b in zip(entries, source)):
        return kept, out.grid_thw
    index = {id(f): i for i, f in enumerate(source)}
    try:
        order = [index[id(f)] for f in entries]
    except KeyError:
        raise ValueError(
            f"VisionZip: the {kind} features given to the Qwen forward are not those get_{kind}_features "
            f"returned (or repeats of them); pass the pixel values, or the unmodified {kind} output"
        ) from None
    return [kept[i] for i in order], out.grid_thw[torch.tensor(order, device=out.grid_thw.device)]


def _offset_indices(parts: list[torch.Tensor], offsets: list[int]) -> torch.Tensor:
    return torch.cat([t + o for t, o in zip(parts, offsets)])


def _group_token_maps(maps: list[torch.Tensor], row_offsets: list[int]) -> torch.Tensor:
    """token maps of an item's temporal groups -> one map into the item's rows (-1 stays -1)."""
    return torch.cat([torch.where(m >= 0, m + o, m) for m, o in zip(maps, row_offsets)])


def cache_length(kwargs: dict) -> int:
    """Tokens already in the KV cache, under the name the installed transformers uses (``cache``
    from 5.24, ``past_key_values`` before)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache.get_seq_length() if cache is not None else 0


def patch(handle: Handle, base: torch.nn.Module, *, deepstack: bool = False) -> None:
    """Qwen2-VL / Qwen2.5-VL (``deepstack`` False) and Qwen3-VL (``deepstack``: the features the tower
    injects into the LLM's first layers are reduced with the same choices and handed on through
    ``mm_encoder_outputs``, which the model's forward scatters and injects)."""
    visual = base.visual
    block_index = selection_block(visual)
    merge = visual.spatial_merge_size
    unit = merge**2
    output_cls = output_class()
    reducer = handle.reducer
    hint = reducer.processor_hint()
    original_rope_index = base.get_rope_index
    original_forward = base.forward
    if deepstack and not HAS_MM_ENCODER_OUTPUTS:
        raise NotImplementedError(
            "VisionZip: Qwen3-VL needs transformers >= 5.18 (its forward takes mm_encoder_outputs, through which "
            "the reduced deepstack features reach the language model)"
        )

    def encode(pixels: torch.Tensor, grid_thw: torch.Tensor, kwargs: dict):
        """Run the tower on images or videos (``grid_thw`` (items, 3)); reduce every temporal group of
        every item (an image is one group) on its own: per item sum over groups of tokens(h w / 4) rows."""
        kwargs.pop("return_dict", None)
        pixels = pixels.type(visual.dtype)
        block = visual.blocks[block_index]
        with Capture() as cap:
            cap.output(block.attn.qkv, "qkv")
            cap.inputs(block.attn, "attn_in")
            out = visual(pixels, grid_thw=grid_thw, **kwargs)
        unit_scores, unit_keys = unit_scores_and_keys(visual, block_index, cap, grid_thw)
        layers = list(getattr(out, "deepstack_features", None) or []) if deepstack else []
        merged = out.pooler_output
        features, kept, dominant, contextual, token_maps, deep = [], [], [], [], [], [[] for _ in layers]
        start = 0
        for t, h, w in grid_thw.tolist():
            per = h * w // unit
            rows, item_kept, dom, ctx, maps, row_offsets = [], [], [], [], [], []
            item_deep = [[] for _ in layers]
            for g in range(t):
                sl = slice(start + g * per, start + (g + 1) * per)
                r = reducer.reduce(Selection(merged[None, sl], unit_scores[None, sl], unit_keys[None, sl], False))
                row_offsets.append(sum(x.shape[0] for x in rows))
                rows.append(r.features[0])
                item_kept.append(r.kept_indices[0] + g * per)
                if r.details is not None:
                    dom.append(r.details.dominant_indices[0] + g * per)
                    ctx.append(r.details.contextual_indices[0] + g * per)
                    maps.append(r.details.token_map[0])
                for i, layer in enumerate(layers):
                    item_deep[i].append(reducer.replay(r, layer[None, sl])[0])
            start += t * per
            features.append(torch.cat(rows))
            kept.append(torch.cat(item_kept))
            if dom:
                dominant.append(torch.cat(dom))
                contextual.append(torch.cat(ctx))
                token_maps.append(_group_token_maps(maps, row_offsets))
            for i in range(len(layers)):
                deep[i].append(torch.cat(item_deep[i]))
        features = tuple(features)
        extra = {"deepstack_features": [tuple(d) for d in deep]} if deepstack else {}
        return output_cls(
            last_hidden_state=out.last_hidden_state,
            pooler_output=features,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            kept_indices=kept,
            dominant_indices=dominant or None,
            contextual_indices=contextual or None,
            token_map=token_maps or None,
            grid_thw=grid_thw,
            source_features=features,
            **extra,
        )

    def get_image_features(pixel_values: torch.Tensor, image_grid_thw: Optional[torch.LongTensor] = None, **kwargs: Any):
        """Replacement of ``get_image_features``: per image the reduced rows of its merged tokens
        (VisionZip: min(budget, merged tokens))."""
        if image_grid_thw is None:
            raise ValueError("VisionZip: Qwen get_image_features needs image_grid_thw")
        return encode(pixel_values, image_grid_thw, kwargs)

    def get_video_features(pixel_values_videos: torch.Tensor, video_grid_thw: Optional[torch.LongTensor] = None,
                           **kwargs: Any):
        """Replacement of ``get_video_features``: per video, every temporal group (``temporal_patch_size``
        frames) reduced on its own (VisionZip: min(budget, merged tokens of a group) per group)."""
        if video_grid_thw is None:
            raise ValueError("VisionZip: Qwen get_video_features needs video_grid_thw")
        return encode(pixel_values_videos, video_grid_thw, kwargs)

    def get_rope_index(input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                       attention_mask=None, **kwargs):
        """``get_rope_index`` for prompts with reduced placeholder runs, before their kept tokens are
        known (``generate`` asks before encoding): the first tokens of each run stand in; the
        patched forward recomputes the prefill positions once the images are encoded."""
        specs = {1: run_specs(image_grid_thw, None, merge, False), 2: run_specs(video_grid_thw, None, merge, deepstack)}
        return rope_index(original_rope_index, input_ids, mm_token_type_ids, attention_mask, specs, hint,
                          image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw, **kwargs)

    def forward(input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, pixel_values=None,
                pixel_values_videos=None, image_grid_thw=None, video_grid_thw=None, mm_token_type_ids=None,
                mm_encoder_outputs=None, **kwargs):
        """Encode images and videos first (reduced), place their features at the placeholders, give
        those tokens the positions of the tokens they stand for, then run the original forward.

        Qwen2-VL / 2.5-VL: the features are scattered here rather than handed on as
        ``mm_encoder_outputs``, which transformers before 5.18 lacks (and would drop silently).
        Qwen3-VL: handed on, so that the model injects the reduced deepstack features. The KV cache
        stays in ``kwargs`` under the installed version's name (``cache`` from 5.24)."""
        pending = dict(mm_encoder_outputs or {})
        outs = {}
        for kind, pixels, grid, encoder in (("image", pixel_values, image_grid_thw, get_image_features),
                                            ("video", pixel_values_videos, video_grid_thw, get_video_features)):
            out = pending.pop(kind, None)
            if isinstance(out, output_cls) and out.kept_indices is None:
                # generate's chunked prefill (5.23+) slices the encoded features per chunk and drops
                # the other fields: the positions (which need the kept indices) would be guesses
                raise NotImplementedError(_CHUNKED)
            if out is None and pixels is not None:
                out = encoder(pixels, grid)
            if out is not None:
                outs[kind] = out
        if pending:
            kwargs["mm_encoder_outputs"] = pending
        if not outs and input_ids is not None and inputs_embeds is None and input_ids.shape[1] > 1:
            ids = (base.config.image_token_id, base.config.video_token_id)
            if bool(torch.isin(input_ids, torch.tensor(ids, device=input_ids.device)).any()):
                # placeholders with neither pixels nor features: generate's chunked prefill before
                # 5.23 drops both from every chunk (or the caller forgot them)
                raise NotImplementedError(_CHUNKED)
        if outs and not deepstack:
            if inputs_embeds is None:
                inputs_embeds = base.get_input_embeddings()(input_ids)
            for kind, out in outs.items():
                embeds = torch.cat(tuple(out.pooler_output), dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
                masks = base.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, **{f"{kind}_features": embeds})
                inputs_embeds = inputs_embeds.masked_scatter(masks[0 if kind == "image" else 1], embeds)
        elif outs:
            kwargs["mm_encoder_outputs"] = {**kwargs.get("mm_encoder_outputs", {}), **outs}
        image_kept, image_grid = kept_per_entry(outs.get("image"), "image")
        video_kept, video_grid = kept_per_entry(outs.get("video"), "video")
        if outs and input_ids is not None and mm_token_type_ids is not None and cache_length(kwargs) == 0:
            specs = {1: run_specs(image_grid, image_kept, merge, False),
                     2: run_specs(video_grid, video_kept, merge, deepstack)}
            extra = {k: kwargs[k] for k in ("second_per_grid_ts",) if kwargs.get(k) is not None}
            positions, deltas = rope_index(
                original_rope_index, input_ids, mm_token_type_ids, attention_mask, specs, hint,
                image_grid_thw=image_grid, video_grid_thw=video_grid, **extra,
            )
            if position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] == 4:
                positions = torch.cat([position_ids[:1], positions.to(position_ids)], dim=0)  # keep text row
            position_ids = positions
            base.rope_deltas = deltas
        return original_forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids, **kwargs,
        )

    handle.set(base, "get_image_features", get_image_features)
    handle.set(base, "get_video_features", get_video_features)
    handle.set(base, "get_rope_index", get_rope_index)
    handle.set(base, "forward", forward)
    patch_placeholder_check(handle, base, "the reduced count of the merged tokens per image / frame group")


_CHUNKED = (
    "VisionZip (Qwen): chunked prefill (prefill_chunk_size) with images or videos is not supported; the "
    "positions of the reduced tokens need the whole prompt. Generate without it."
)


def image_tokens(processor: Any, image_inputs: dict, image_idx: int, reducer: Reducer, options: dict) -> int:
    """Placeholders per image: the reduced count of its merged tokens."""
    grid = image_inputs["image_grid_thw"][image_idx]
    return reducer.tokens(int(grid.prod()) // processor.image_processor.merge_size**2)


def video_text(processor: Any, video_inputs: dict, video_idx: int, reducer: Reducer, options: dict) -> str:
    """The processor's own placeholder text for a video (Qwen3-VL interleaves frame timestamps), with
    each temporal group's run of merged tokens shortened to its reduced count."""
    t, h, w = (int(x) for x in video_inputs["video_grid_thw"][video_idx])  # noqa: F841 (h, w: documentation)
    per_group = h * w // processor.video_processor.merge_size**2
    text = type(processor).replace_video_token(processor, video_inputs, video_idx)
    token = processor.video_token
    if text.count(token) != t * per_group:
        raise ValueError(f"VisionZip: unexpected video placeholder text of {type(processor).__name__}")
    # Qwen2 / 2.5-VL: one run of t groups; Qwen3-VL: t runs of one group each: the same replacement
    return text.replace(token * per_group, token * reducer.tokens(per_group))


FAMILY = register_family(
    Family("qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), ("Qwen2VLProcessor", "Qwen2_5_VLProcessor"), patch, image_tokens,
           video_text)
)
