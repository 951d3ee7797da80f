"""Qwen2-VL and Qwen2.5-VL (``model_type`` "qwen2_vl", "qwen2_5_vl"; no CLS): scores at the last
full-attention block of the vision tower (Qwen2.5-VL windows the others), from the RoPE-rotated q / k
the block attends with, per image (``cu_seqlens``); keys are the un-rotated projections (a rotation
would make similarity positional). Scores and keys are averaged over each 2x2 merge unit (Qwen2.5-VL's
window order undone with the model's own ``window_index``); the reducer runs on the merger output,
one call per image. Every reduced token takes the M-RoPE position of the token it stands for; text
after an image keeps the position it has without reduction.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch

from ..core import Reducer, Selection, expand_runs, merged_unit_selection
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
    return merged_unit_selection(q_rot, k_rot, k, attn.scaling, cu_seqlens, visual.spatial_merge_size**2, order)


def image_runs(types_row: torch.Tensor, valid_row: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of the runs of image tokens (type 1) among valid tokens of one row."""
    is_img = ((types_row == 1) & valid_row).to(torch.int8)
    edges = torch.diff(is_img, prepend=is_img.new_zeros(1), append=is_img.new_zeros(1))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


def rope_index(
    base: torch.nn.Module,
    original: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    image_grid_thw: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    kept: Optional[list],
    hint: str,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids of a sequence whose image runs hold compressed tokens.

    Each image run is expanded back to the image's full merged-token count, the model's own
    ``get_rope_index`` runs on that layout, and each compressed token takes the position of the token
    it stands for (``kept[i][r]``: for VisionZip a dominant token, or a contextual target). Text after an image keeps
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
        pieces_ids, pieces_types, pieces_valid, orders, fulls = [], [], [], [], []
        cursor = 0
        runs = image_runs(mm_token_type_ids[b], valid[b])
        for start, end in runs:
            run, full = end - start, units[image]
            if run > full:
                raise ValueError(
                    f"VisionZip: image {image} has {run} placeholder tokens but only {full} tokens. " + hint
                )
            order = kept[image].to(device) if kept is not None else torch.arange(run, device=device)
            if order.numel() != run:
                raise ValueError(
                    f"VisionZip: image {image} has {run} placeholder tokens but {order.numel()} reduced "
                    f"tokens. " + hint
                )
            pieces_ids += [input_ids[b, cursor:start], input_ids.new_full((full,), int(input_ids[b, start]))]
            pieces_types += [mm_token_type_ids[b, cursor:start], mm_token_type_ids.new_ones(full)]
            pieces_valid += [valid[b, cursor:start], valid.new_ones(full)]
            orders.append(order)
            fulls.append(full)
            cursor = end
            image += 1
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
    positions, _ = original(
        ids, mm_token_type_ids=types, image_grid_thw=image_grid_thw, attention_mask=mask, **kwargs
    )
    gather = torch.stack(index_maps).to(positions.device)
    positions = positions.gather(2, gather.unsqueeze(0).expand(positions.shape[0], -1, -1))
    valid_p = valid.to(positions.device)
    top = positions.masked_fill(~valid_p.unsqueeze(0), -1).amax(dim=(0, 2))
    deltas = (top + 1 - valid_p.sum(dim=1)).unsqueeze(1)
    return positions, deltas


def kept_per_entry(image_out: Any) -> tuple[Optional[list], Optional[torch.Tensor]]:
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


def patch(handle: Handle, base: torch.nn.Module) -> None:
    visual = base.visual
    block_index = selection_block(visual)
    merge_unit = visual.spatial_merge_size**2
    output_cls = output_class()
    reducer = handle.reducer
    hint = reducer.processor_hint()
    original_rope_index = base.get_rope_index
    original_forward = base.forward

    def get_image_features(pixel_values: torch.Tensor, image_grid_thw: Optional[torch.LongTensor] = None, **kwargs: Any):
        """Replacement of ``get_image_features``: per image the reduced rows of its merged tokens
        (VisionZip: min(budget, merged tokens))."""
        if image_grid_thw is None:
            raise ValueError("VisionZip: Qwen get_image_features needs image_grid_thw")
        kwargs.pop("return_dict", None)
        pixel_values = pixel_values.type(visual.dtype)
        block = visual.blocks[block_index]
        with Capture() as cap:
            cap.output(block.attn.qkv, "qkv")
            cap.inputs(block.attn, "attn_in")
            out = visual(pixel_values, grid_thw=image_grid_thw, **kwargs)
        unit_scores, unit_keys = unit_scores_and_keys(visual, block_index, cap, image_grid_thw)
        sizes = (image_grid_thw.prod(-1) // merge_unit).tolist()
        merged = out.pooler_output
        reductions = [
            reducer.reduce(Selection(hidden[None], scores[None], keys[None], has_cls=False))
            for hidden, scores, keys in zip(merged.split(sizes), unit_scores.split(sizes), unit_keys.split(sizes))
        ]
        features = tuple(r.features[0] for r in reductions)
        details = [r.details for r in reductions]
        return output_cls(
            last_hidden_state=out.last_hidden_state,
            pooler_output=features,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            kept_indices=[r.kept_indices[0] for r in reductions],
            dominant_indices=[d.dominant_indices[0] for d in details] if None not in details else None,
            contextual_indices=[d.contextual_indices[0] for d in details] if None not in details else None,
            token_map=[d.token_map[0] for d in details] if None not in details else None,
            grid_thw=image_grid_thw,
            source_features=features,
        )

    def get_rope_index(input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                       attention_mask=None, visionzip_kept=None, **kwargs):
        """Compression-aware ``get_rope_index`` (see :func:`_qwen_rope_index`)."""
        kwargs = {k: v for k, v in kwargs.items() if k in ("second_per_grid_ts",)}
        return rope_index(
            base, original_rope_index, input_ids, mm_token_type_ids, image_grid_thw, attention_mask,
            visionzip_kept, hint, video_grid_thw=video_grid_thw, **kwargs,
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
        kept, grid = kept_per_entry(image_out)
        cached = past_key_values.get_seq_length() if past_key_values is not None else 0
        if kept is not None and input_ids is not None and mm_token_type_ids is not None and cached == 0:
            extra = {k: kwargs[k] for k in ("second_per_grid_ts",) if kwargs.get(k) is not None}
            positions, deltas = rope_index(
                base, original_rope_index, input_ids, mm_token_type_ids, grid, attention_mask,
                kept, hint, video_grid_thw=kwargs.get("video_grid_thw"), **extra,
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

    handle.set(base, "get_image_features", get_image_features)
    handle.set(base, "get_rope_index", get_rope_index)
    handle.set(base, "forward", forward)
    patch_placeholder_check(handle, base, "the reduced count of the merged tokens per image")


def image_tokens(processor: Any, image_inputs: dict, image_idx: int, reducer: Reducer) -> int:
    """Placeholders per image: the reduced count of its merged tokens."""
    grid = image_inputs["image_grid_thw"][image_idx]
    return reducer.tokens(int(grid.prod()) // processor.image_processor.merge_size**2)


FAMILY = register_family(
    Family("qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), ("Qwen2VLProcessor", "Qwen2_5_VLProcessor"), patch, image_tokens)
)
