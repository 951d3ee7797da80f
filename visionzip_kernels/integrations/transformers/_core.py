"""What every transformers model family shares: the handle that records and undoes instance
patches, the forward hooks that capture a selection layer, the placeholder check, the processor
patching, the output class, and the registry that maps ``config.model_type`` to a family module.

A family module (``llava.py``, ``qwen2_vl.py``, ...) registers a :class:`Family`: how to patch a
model's base (``patch(handle, base)``) and how many placeholders its processor must emit per image
(``image_tokens``). The token-reduction method is the handle's :class:`~..core.Reducer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..._validation import feature_layer_depth
from ...methods.vistog import GroupingResult, SideCar
from ..core import Capture, Reducer, Selection, SideCarTokens, mean_keys, selection_scores, split_heads

HANDLE_ATTR = "_visionzip_handle"
PROCESSOR_ATTR = "_visionzip_processor_state"
_MISSING = object()


# --------------------------------------------------------------------------------------------
# Family registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A model family: the ``config.model_type`` values it serves, the processor classes that go with
    it, how to patch the base model (the object holding ``get_image_features``), the number of
    placeholders per image (``image_tokens(processor, image_inputs, image_idx, reducer, options)``)
    and the placeholder text per video (``video_tokens``, same arguments; None: videos are not
    supported), its options with their defaults (e.g. LLaVA-NeXT's ``layout``), and whether its patch
    runs a reducer's side-car tokens through the tower (``side_car``)."""

    name: str
    model_types: tuple[str, ...]
    processor_classes: tuple[str, ...]
    patch: Callable[["Handle", torch.nn.Module], None]
    image_tokens: Callable[[Any, dict, int, Reducer, dict], int]
    video_tokens: Optional[Callable[[Any, dict, int, Reducer, dict], str]] = None
    defaults: tuple[tuple[str, Any, tuple], ...] = ()  # (option, default, allowed values)
    side_car: bool = False

    def resolve_options(self, options: dict) -> dict:
        """The family's options: ``options`` checked against the allowed values, defaults filled in."""
        allowed = {name: values for name, _, values in self.defaults}
        for name, value in options.items():
            if name not in allowed:
                raise ValueError(
                    f"VisionZip: option {name}={value!r} does not apply to the {self.name} family "
                    f"(its options: {sorted(allowed) or 'none'})"
                )
            if value not in allowed[name]:
                raise ValueError(f"VisionZip: {name} must be one of {allowed[name]} for {self.name}; got {value!r}")
        return {name: options.get(name, default) for name, default, _ in self.defaults}


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


def model_family(model: torch.nn.Module) -> tuple[Family, torch.nn.Module]:
    """(family, base model holding get_image_features) of a supported model or base model."""
    config = getattr(model, "config", None)
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        supported = ", ".join(sorted(FAMILIES))
        raise TypeError(
            f"VisionZip: unsupported model {type(model).__name__} (model_type "
            f"{getattr(config, 'model_type', None)!r}); supported model types: {supported}"
        )
    inner = getattr(model, "model", None)
    base = inner if isinstance(inner, torch.nn.Module) and hasattr(inner, "get_image_features") else model
    return family, base


def processor_family(processor: Any) -> Family:
    """The family of a processor, by its class (most derived first, so that a subclass of a supported
    processor class is served by its closest supported base)."""
    for cls in type(processor).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ in family.processor_classes:
                return family
    supported = sorted({c for f in FAMILIES.values() for c in f.processor_classes})
    raise TypeError(
        f"VisionZip: unsupported processor {type(processor).__name__}; supported: {', '.join(supported)}"
    )


# --------------------------------------------------------------------------------------------
# Handle
# --------------------------------------------------------------------------------------------


class Handle:
    """What :func:`apply_visionzip` changed on one model (and optionally its processor).

    Attributes: ``family`` (its name, e.g. "llava"), ``reducer`` (the method, e.g. VisionZip with its
    ``budget`` / ``dominant`` / ``contextual`` / ``backend``), ``processor`` (the patched processor
    or None). ``remove()`` undoes everything.
    """

    def __init__(self, model: torch.nn.Module, family: Family, reducer: Reducer, options: Optional[dict] = None):
        self.model = model
        self.family = family.name
        self.reducer = reducer
        self.options = family.resolve_options(options or {})
        self.processor: Any = None
        self._patches: list[tuple[Any, str, Any]] = []
        self._removed = False

    def __getattr__(self, name: str) -> Any:
        # budget / dominant / contextual / backend of the reducer, for convenience
        if name.startswith("_") or name in ("model", "family", "reducer", "processor", "options"):
            raise AttributeError(name)
        return getattr(self.reducer, name)

    def set(self, obj: Any, name: str, value: Any) -> None:
        """Put ``value`` in ``obj.__dict__[name]``, remembering what was there."""
        self._patches.append((obj, name, obj.__dict__.get(name, _MISSING)))
        obj.__dict__[name] = value

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
            remove_processor_patch(self.processor)
            self.processor = None
        self._removed = True

    def __repr__(self) -> str:
        return (f"VisionZipHandle(family={self.family!r}, reducer={self.reducer!r}, options={self.options}, "
                f"removed={self._removed})")


# --------------------------------------------------------------------------------------------
# Capturing a selection layer
# --------------------------------------------------------------------------------------------


def encoder_layers(tower: torch.nn.Module) -> torch.nn.ModuleList:
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


def selection_layer(tower: torch.nn.Module, vision_feature_layer: Any) -> torch.nn.Module:
    """The encoder layer whose output is ``hidden_states[vision_feature_layer]``."""
    if not isinstance(vision_feature_layer, int):
        raise NotImplementedError(
            f"VisionZip supports a single int vision_feature_layer; got {vision_feature_layer!r}"
        )
    layers = encoder_layers(tower)
    return layers[feature_layer_depth("vision_feature_layer", vision_feature_layer, len(layers)) - 1]


def run_clip_like_tower(
    tower: torch.nn.Module, pixel_values: torch.Tensor, layer: torch.nn.Module, has_cls: bool,
    side_car: Optional[SideCarTokens] = None, **kwargs: Any,
) -> tuple[Any, Selection]:
    """Run a CLIP / SigLIP tower with its own attention implementation, capturing ``layer``'s output
    and q / k projections. With ``side_car``, its tokens also run beside the image tokens up to
    ``layer`` with isolated attention (:class:`~visionzip_kernels.methods.vistog.SideCar`; the tower's
    outputs are unchanged). Returns (tower output, selection of that layer)."""
    attn = layer.self_attn
    with Capture() as cap:
        cap.output(attn.q_proj, "q")
        cap.output(attn.k_proj, "k")
        cap.output(layer, "hidden")
        if side_car is None:
            out = tower(pixel_values, return_dict=True, **kwargs)
        else:
            depth = next(i for i, x in enumerate(encoder_layers(tower)) if x is layer) + 1
            with SideCar(tower, side_car.tokens, depth=depth, semantic_attention=side_car.attend_each_other) as car:
                out = tower(pixel_values, return_dict=True, **kwargs)
    q, k = split_heads(cap["q"], attn.num_heads), split_heads(cap["k"], attn.num_heads)
    scores = selection_scores(q, k, attn.scale, has_cls=has_cls)
    states = None if side_car is None else car.output
    return out, Selection(cap["hidden"], scores, mean_keys(k), has_cls, side_car=states)


# --------------------------------------------------------------------------------------------
# Placeholder check (patched get_placeholder_mask)
# --------------------------------------------------------------------------------------------


def count_placeholders(base: torch.nn.Module, input_ids: Optional[torch.Tensor], inputs_embeds: torch.Tensor,
                       token_id: int) -> int:
    if input_ids is not None:
        return int((input_ids == token_id).sum())
    ref = base.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
    return int((inputs_embeds == ref).all(-1).sum())


def patch_placeholder_check(handle: Handle, base: torch.nn.Module, per_item: str) -> None:
    """A clear error, naming the processor patch, when the prompt's image (or video) placeholders do
    not match the reduced features (an unpatched processor's input)."""
    original = base.get_placeholder_mask
    config = base.config

    def check(kind: str, features: Optional[torch.Tensor], input_ids, inputs_embeds) -> None:
        token_id = getattr(config, f"{kind}_token_id", None)
        if features is None or token_id is None:
            return
        n_tokens = count_placeholders(base, input_ids, inputs_embeds, token_id)
        n_rows = features.numel() // inputs_embeds.shape[-1]
        if n_tokens != n_rows:
            raise ValueError(
                f"{handle.reducer.name}: the input has {n_tokens} {kind} placeholder tokens but the reduced "
                f"{kind} features have {n_rows} rows ({per_item}). " + handle.reducer.processor_hint()
            )

    def get_placeholder_mask(input_ids=None, inputs_embeds=None, image_features=None, **kwargs):
        check("image", image_features, input_ids, inputs_embeds)
        check("video", kwargs.get("video_features"), input_ids, inputs_embeds)
        return original(input_ids, inputs_embeds=inputs_embeds, image_features=image_features, **kwargs)

    handle.set(base, "get_placeholder_mask", get_placeholder_mask)


# --------------------------------------------------------------------------------------------
# Processors
# --------------------------------------------------------------------------------------------


@dataclass
class _ProcessorState:
    reducer: Reducer
    family: str
    options: dict
    old: dict


def patch_processor(processor: Any, reducer: Reducer, options: Optional[dict] = None) -> Any:
    """Make ``processor`` expand each image (and video) placeholder to the family's reduced token count
    (in place); :func:`remove_processor_patch` undoes it. A family without video support makes
    the processor refuse videos with a clear error instead of emitting uncompressed counts."""
    family = processor_family(processor)
    options = family.resolve_options(options or {})
    if PROCESSOR_ATTR in processor.__dict__:
        raise RuntimeError("VisionZip is already applied to this processor; call remove_visionzip_processor first")

    def replace_image_token(image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        return processor.image_token * family.image_tokens(processor, image_inputs, image_idx, reducer, options)

    def replace_video_token(video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
        if family.video_tokens is None:
            raise NotImplementedError(
                f"{reducer.name}: videos are not supported for the {family.name} family (images are)"
            )
        return family.video_tokens(processor, video_inputs, video_idx, reducer, options)

    names = ("replace_image_token", "replace_video_token")
    old = {name: processor.__dict__.get(name, _MISSING) for name in names}
    processor.__dict__["replace_image_token"] = replace_image_token
    processor.__dict__["replace_video_token"] = replace_video_token
    processor.__dict__[PROCESSOR_ATTR] = _ProcessorState(reducer, family.name, options, old)
    return processor


def remove_processor_patch(processor: Any) -> Any:
    """Undo :func:`patch_processor` (no-op on an unpatched processor)."""
    state = processor.__dict__.pop(PROCESSOR_ATTR, None)
    if state is None:
        return processor
    for name, old in state.old.items():
        if old is _MISSING:
            processor.__dict__.pop(name, None)
        else:
            processor.__dict__[name] = old
    return processor


# --------------------------------------------------------------------------------------------
# Output class of the patched get_image_features
# --------------------------------------------------------------------------------------------


def _make_output_class() -> type:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    @dataclass
    class VisionZipImageOutput(BaseModelOutputWithPooling):  # type: ignore[misc, valid-type]
        """``get_image_features`` output of a patched model.

        pooler_output: per image, the (tokens, C_text) features the LLM receives.
        dominant_indices / contextual_indices / token_map: per image, the :class:`CompressResult`
            indices of the compress call (rows = crops for LLaVA-NeXT / OneVision, 1 row otherwise).
        kept_indices: per image, (k,) int64 index of the token each output row stands for
            (dominant indices, then contextual targets): the row order fed to the LLM.
        group_labels / group_counts: VisToG only, per image, the (patches,) semantic token each patch
            was assigned to and the (M,) patches per semantic token.
        grid_thw: Qwen only, the (num_images, 3) grid of the images.
        source_features: Qwen only, the per-image features as produced (the same tensor objects as
            pooler_output until ``generate`` repeats images per beam / returned sequence, which
            rewrites pooler_output only); maps repeated entries back to their indices and grids.
        row_order: LLaVA-NeXT / OneVision only, per image (T,) the index of each fed row among the
            image's crops x k reduced rows flattened (crops x k stands for the image_newline).
        deepstack_features: Qwen3-VL only, per deepstack layer a tuple of per-item reduced features.
        """

        dominant_indices: Optional[list] = None
        contextual_indices: Optional[list] = None
        token_map: Optional[list] = None
        kept_indices: Optional[list] = None
        group_labels: Optional[list] = None
        group_counts: Optional[list] = None
        grid_thw: Optional[torch.Tensor] = None
        source_features: Optional[tuple] = None
        row_order: Optional[list] = None
        deepstack_features: Optional[list] = None

    VisionZipImageOutput.__module__ = "visionzip_kernels.integrations.transformers"
    VisionZipImageOutput.__qualname__ = "VisionZipImageOutput"
    return VisionZipImageOutput


_OUTPUT_CLASS: Optional[type] = None


def output_class() -> type:
    """The :class:`VisionZipImageOutput` class (built on first use: it needs transformers)."""
    global _OUTPUT_CLASS
    if _OUTPUT_CLASS is None:
        _OUTPUT_CLASS = _make_output_class()
    return _OUTPUT_CLASS


def per_image_fields(details_rows: Any, split: Optional[list[int]] = None) -> dict:
    """The output fields of a reducer's record, per image (rows grouped by ``split`` when an image
    spans several rows, e.g. crops): dominant_indices / contextual_indices / token_map of a
    CompressResult, group_labels / group_counts of a VisToG GroupingResult."""
    if details_rows is None:
        return {}

    def per(t: torch.Tensor) -> list:
        return list(t.split(split)) if split is not None else list(t.unbind(0))

    if isinstance(details_rows, GroupingResult):
        return dict(group_labels=per(details_rows.labels), group_counts=per(details_rows.counts))
    return dict(
        dominant_indices=per(details_rows.dominant_indices),
        contextual_indices=per(details_rows.contextual_indices),
        token_map=per(details_rows.token_map),
    )
