"""Functions the tests run inside vLLM's worker processes (``LLM.apply_model(fn)`` calls ``fn(model)``
on every tensor-parallel rank and returns the results). They record, on the model instance, what
the encoder produced, which tokens the reducer kept, and what the language model received, so a
test can compare them with the transformers integration. Shipped by value (cloudpickle)."""

from __future__ import annotations

import torch


def record(model) -> str:
    """Start recording: embed_multimodal outputs, reducer kept indices, and per forward call the
    positions and inputs_embeds the language model got (read after the call: a VisionZip Qwen model
    fixes its image positions in place)."""
    store = {"embeds": [], "kept": [], "forward": []}
    model.__dict__["_probe"] = store
    embed = model.embed_multimodal
    forward = model.forward

    def embed_multimodal(**kwargs):
        out = embed(**kwargs)
        store["embeds"].append([o.detach().cpu().clone() for o in out])
        return out

    def forward_recorded(input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        out = forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        emb = None if inputs_embeds is None else inputs_embeds.detach().cpu().clone()
        store["forward"].append({"positions": positions.detach().cpu().clone(), "inputs_embeds": emb})
        return out

    model.embed_multimodal = embed_multimodal
    model.forward = forward_recorded
    reducer = getattr(model, "reducer", None)
    if reducer is not None:
        reduce = reducer.reduce

        def reduce_recorded(selection):
            out = reduce(selection)
            store["kept"].append(out.kept_indices.detach().cpu().clone())
            return out

        reducer.reduce = reduce_recorded
    return type(model).__module__ + "." + type(model).__name__


def take(model) -> dict:
    """What was recorded since the last call (and clear it)."""
    store = model.__dict__["_probe"]
    out = {k: list(v) for k, v in store.items()}
    for v in store.values():
        v.clear()
    return out


def tower_batches(model, pixel_values: torch.Tensor) -> list[int]:
    """Run the model's image encoding on ``pixel_values`` and return the batch size of every call of
    the CLIP tower (micro-batching check)."""
    sizes: list[int] = []
    hook = model.vision_tower.register_forward_pre_hook(lambda mod, args: sizes.append(int(args[0].shape[0])))
    try:
        model.embed_multimodal(pixel_values=pixel_values.to(next(model.parameters()).dtype))
    finally:
        hook.remove()
    return sizes
