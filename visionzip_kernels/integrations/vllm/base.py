"""What the vLLM model families share: the per-engine settings read from ``hf_overrides``, the checks
that fail at engine start, the CLIP selection layer read through hooks, tensor-parallel combining of
scores and keys, micro-batching of the tower, and the M-RoPE offsets carried in embedding channels.

Every family module (``llava.py``, ``llava_next.py``, ``qwen2_vl.py``) subclasses vLLM's own
processing-info and model classes; this module imports vLLM (it is only imported where vLLM loads a
VisionZip architecture). vLLM internals relied on are listed in docs/vllm.md.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from ..core import Capture, Reducer, Reduction, Selection, VisionZip, mean_keys, selection_scores, split_heads
from ...ops.compress import CompressResult
from . import TESTED_VLLM

logger = logging.getLogger("visionzip_kernels.integrations.vllm")

#: hf_overrides keys (read from the model's hf_config after vLLM applied the overrides).
BUDGET_KEY = "visionzip_budget"
CONTEXTUAL_KEY = "visionzip_contextual"

#: Extra channels a Qwen image embedding carries from the encoder to ``embed_input_ids``: the
#: (t, h, w) grid coordinate of the token each row stands for, each as (value // 256, value % 256) so
#: that it is exact in bfloat16 (integers up to 256) for grids up to 65535 units a side.
POSITION_CHANNELS = 6
_RADIX = 256


def _how_to(architecture: str) -> str:
    return (f"VisionZip is configured per engine through hf_overrides, e.g. LLM(model, hf_overrides="
            f"{{'architectures': ['{architecture}'], '{BUDGET_KEY}': 64}}) or vllm serve MODEL --hf-overrides "
            f"'{{\"architectures\": [\"{architecture}\"], \"{BUDGET_KEY}\": 64}}'.")


def config_error(architecture: str, message: str) -> ValueError:
    """A ValueError that names the architecture and says how VisionZip is configured."""
    return ValueError(f"VisionZip ({architecture}): {message} " + _how_to(architecture))


def reducer_from_config(hf_config: Any, architecture: str) -> Reducer:
    """The engine's reducer: VisionZip with ``visionzip_budget`` (required) and ``visionzip_contextual``
    (optional, default budget * 5 // 32) from the hf_config after ``hf_overrides``."""
    budget = getattr(hf_config, BUDGET_KEY, None)
    contextual = getattr(hf_config, CONTEXTUAL_KEY, None)
    if budget is None:
        raise config_error(architecture, f"hf_overrides must set '{BUDGET_KEY}' (tokens kept per image or crop).")
    for key, value in ((BUDGET_KEY, budget), (CONTEXTUAL_KEY, contextual)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise config_error(architecture, f"'{key}' must be an int; got {value!r}.")
    try:
        return VisionZip(budget, contextual=contextual)
    except ValueError as exc:
        raise config_error(
            architecture, f"'{BUDGET_KEY}'={budget!r}, '{CONTEXTUAL_KEY}'={contextual!r}: {exc}."
        ) from None


def check_model_type(model_config: Any, architecture: str, model_types: tuple[str, ...]) -> None:
    """A TypeError when the VisionZip architecture does not serve the checkpoint's model_type."""
    model_type = model_config.hf_config.model_type
    if model_type not in model_types:
        raise TypeError(
            f"VisionZip ({architecture}): this architecture serves model_type {' / '.join(model_types)}, but the "
            f"checkpoint is {model_type!r}; docs/vllm.md lists the VisionZip architecture of each model. "
            + _how_to(architecture)
        )


def check_model_config(model_config: Any, architecture: str) -> Reducer:
    """Checks every family makes on the front end (when vLLM builds the multimodal processor, before the
    engine core starts): the settings, and no embedding inputs. Returns the reducer."""
    reducer = reducer_from_config(model_config.hf_config, architecture)
    mm_config = model_config.multimodal_config
    if mm_config is not None and getattr(mm_config, "enable_mm_embeds", False):
        raise config_error(
            architecture,
            "enable_mm_embeds=True is not supported: image embeddings passed as inputs bypass the vision "
            "tower, so there are no scores to select tokens with. Pass images.",
        )
    return reducer


class VisionZipInfo:
    """Mixin for a family's processing info: checks the checkpoint's model_type when built (a TypeError,
    which vLLM does not take for "text-only" as it does a ValueError, see :class:`CheckedProcessor`);
    ``reducer`` is the engine's method, built (and checked, ``visionzip_check``) on first use."""

    architecture: str
    model_types: tuple[str, ...]

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)  # type: ignore[call-arg]
        check_model_type(ctx.model_config, self.architecture, self.model_types)

    def visionzip_check(self) -> Reducer:
        """The family's checks of ``self.ctx.model_config``; returns the reducer."""
        raise NotImplementedError

    @property
    def reducer(self) -> Reducer:
        cached = self.__dict__.get("_visionzip_reducer")
        if cached is None:
            cached = self.__dict__["_visionzip_reducer"] = self.visionzip_check()
        return cached


def untested_vllm(version: str) -> Optional[str]:
    """A warning when vLLM ``version`` is outside :data:`TESTED_VLLM` (the internals this plugin relies on,
    docs/vllm.md, may have moved), else None."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if Version(Version(version).base_version) in SpecifierSet(TESTED_VLLM):
        return None
    return (f"VisionZip: vLLM {version} is outside the tested range {TESTED_VLLM}; docs/vllm.md lists the vLLM "
            "internals the plugin relies on (check the tests/vllm suite passes with this version)")


class CheckedProcessor:
    """Mixin for a family's multimodal processor: runs the info's checks when vLLM builds the processor,
    in the front end when the engine starts. (Not in the info's constructor: vLLM also builds an info
    to probe whether a model takes multimodal inputs, and takes a ValueError there for "text-only".)"""

    def __init__(self, info: Any, dummy_inputs: Any) -> None:
        super().__init__(info, dummy_inputs)  # type: ignore[call-arg]
        info.reducer  # noqa: B018 - raises on a misconfigured engine
        import vllm

        warning = untested_vllm(vllm.__version__)
        if warning:
            logger.warning(warning)


def clip_tokens(vision_config: Any) -> int:
    """Tokens of one CLIP crop: its patches and the CLS token (577 for CLIP-L/336)."""
    return (vision_config.image_size // vision_config.patch_size) ** 2 + 1


def check_clip_tower(hf_config: Any, reducer: Reducer, architecture: str) -> None:
    """LLaVA / LLaVA-NeXT: a CLIP tower, one int ``vision_feature_layer``, a budget within a crop."""
    vision = hf_config.vision_config
    if getattr(vision, "model_type", None) != "clip_vision_model":
        raise config_error(
            architecture,
            f"only CLIP vision towers are supported (the CLS attention row scores the tokens); this checkpoint's "
            f"tower is {getattr(vision, 'model_type', None)!r}.",
        )
    layer = hf_config.vision_feature_layer
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise config_error(
            architecture,
            f"vision_feature_layer must be a single int layer index (the selection layer); got {layer!r} "
            "(multi-layer features are not supported).",
        )
    n = clip_tokens(vision)
    budget = getattr(reducer, "budget", None)
    if budget is not None and budget > n:
        raise config_error(
            architecture,
            f"'{BUDGET_KEY}'={budget} is larger than the {n} tokens of a crop "
            f"({vision.image_size} px / patch {vision.patch_size}, CLS included): use 1..{n}.",
        )


def check_clip_model(model_config: Any, architecture: str) -> Reducer:
    """:func:`check_model_config` and :func:`check_clip_tower`; returns the reducer."""
    reducer = check_model_config(model_config, architecture)
    check_clip_tower(model_config.hf_config, reducer, architecture)
    return reducer


def check_position_engine(vllm_config: Any, architecture: str) -> None:
    """Checks that need the whole engine configuration (run in the worker, at model construction) for
    a model that carries M-RoPE offsets from ``embed_input_ids`` to ``forward`` (Qwen): both must run
    on the same rank, and every batch with prefill tokens must run the Python ``forward``."""
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise config_error(architecture, "pipeline parallelism is not supported (tensor parallelism is).")
    mode = vllm_config.compilation_config.cudagraph_mode
    mixed = mode.mixed_mode() if mode is not None and hasattr(mode, "mixed_mode") else None
    if mixed is not None and mixed.name == "FULL":
        raise config_error(
            architecture,
            f"cudagraph_mode={mode.name} replays batches with prefill tokens as one graph, which would skip "
            "the positions of the kept image tokens; use the default (FULL_AND_PIECEWISE) or PIECEWISE.",
        )


# --------------------------------------------------------------------------------------------
# Tensor parallelism, micro-batches
# --------------------------------------------------------------------------------------------


def combine_heads(scores: torch.Tensor, keys: torch.Tensor, tp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores summed over this rank's heads and keys averaged over them -> over all heads.

    Under tensor parallelism the tower's heads are split evenly over the ranks: scores are summed
    across ranks, keys averaged, so that every rank selects the same tokens."""
    if tp_size == 1:
        return scores, keys
    from vllm.distributed import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(scores), tensor_model_parallel_all_reduce(keys) / tp_size


def micro_batches(sizes: Sequence[int], limit: int) -> list[tuple[int, int]]:
    """[start, end) groups of consecutive items whose sizes sum to at most ``limit`` (an item larger
    than the limit alone). The tower runs one group at a time, so it never holds more tokens than
    vLLM's encoder budget lets the unpatched model encode in one step, although the budget counts the
    (fewer) reduced tokens."""
    groups, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            groups.append((start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        groups.append((start, len(sizes)))
    return groups


def encoder_budget(vllm_config: Any) -> int:
    """Tokens vLLM lets one encoder step produce (``max_num_encoder_input_tokens``)."""
    return int(vllm_config.scheduler_config.max_num_encoder_input_tokens)


def concat_reductions(parts: list[Reduction]) -> Reduction:
    """Reductions of consecutive micro-batches as one (rows along dim 0)."""
    if len(parts) == 1:
        return parts[0]
    details = [p.details for p in parts]
    merged = None
    if all(d is not None for d in details):
        merged = CompressResult(*(torch.cat(fields, dim=0) for fields in zip(*details)))
    return Reduction(torch.cat([p.features for p in parts]), torch.cat([p.kept_indices for p in parts]), merged)


# --------------------------------------------------------------------------------------------
# CLIP towers (LLaVA, LLaVA-NeXT)
# --------------------------------------------------------------------------------------------


class ClipSelection:
    """Runs vLLM's CLIP tower (built up to ``vision_feature_layer``, so its last layer is the selection
    layer) on every patch and reduces each crop: scores are the CLS row of that layer's attention,
    from the q / k its attention receives (captured by a pre-hook; the attention itself is vLLM's),
    keys its keys averaged over heads.

    tower: vLLM's ``CLIPVisionModel``; reducer: the method; max_crops: crops per tower call."""

    def __init__(self, tower: torch.nn.Module, reducer: Reducer, max_crops: int) -> None:
        self.tower = tower
        self.attn = tower.vision_model.encoder.layers[-1].self_attn
        self.reducer = reducer
        self.max_crops = max(1, max_crops)

    def selection(self, pixel_values: torch.Tensor) -> Selection:
        """(B, 3, H, W) crops -> the selection layer's hidden states (B, N, C), scores (B, N), keys."""
        with Capture() as cap:
            cap.inputs(self.attn.attn, "attn")
            hidden = self.tower(pixel_values, feature_select_strategy="full")
        args, kwargs = cap["attn"]
        q = kwargs.get("query", args[0] if args else None)
        k = kwargs.get("key", args[1] if len(args) > 1 else None)
        heads = self.attn.num_heads_per_partition
        q, k = split_heads(q, heads), split_heads(k, heads)
        scores, keys = combine_heads(
            selection_scores(q, k, self.attn.scale, has_cls=True), mean_keys(k), self.attn.tp_size
        )
        return Selection(hidden, scores, keys, has_cls=True)

    def __call__(self, pixel_values: torch.Tensor) -> Reduction:
        """(B, 3, H, W) crops -> their reductions, (B, k, C) features, the tower run on at most
        ``max_crops`` crops at a time."""
        parts = [self.reducer.reduce(self.selection(chunk)) for chunk in pixel_values.split(self.max_crops)]
        return concat_reductions(parts)


def reject_embeddings(kwargs: dict, architecture: str) -> None:
    """Embedding inputs reach the model only with enable_mm_embeds (refused at engine start); refuse
    them here too rather than feed unreduced rows to a prompt sized for reduced ones."""
    if kwargs.get("image_embeds") is not None:
        raise config_error(architecture, "image embeddings as inputs bypass the vision tower; pass images.")


def uncompressed_crop_tokens(hf_config: Any) -> int:
    """LLM tokens the unpatched model gives one CLIP crop (576 for CLIP-L/336, "default" strategy)."""
    from vllm.model_executor.models.vision import get_num_selected_vision_tokens

    strategy = hf_config.vision_feature_select_strategy
    return get_num_selected_vision_tokens(clip_tokens(hf_config.vision_config), strategy)


class ClipVisionZipModel:
    """The VisionZip part of the LLaVA and LLaVA-NeXT model classes (mixed in before vLLM's class):
    the reducer, the checks, and ``visionzip`` (a :class:`ClipSelection` on the model's tower, run on at
    most as many crops at a time as the unpatched engine's encoder budget holds)."""

    architecture: str
    # The tower runs on all patches but the LLM gets fewer rows: vLLM's tower-LoRA token mapping
    # (one tower token per embedding) would not hold.
    supports_tower_connector_lora = False

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        config = vllm_config.model_config.hf_config
        self.reducer = reducer_from_config(config, self.architecture)
        check_clip_tower(config, self.reducer, self.architecture)
        max_crops = encoder_budget(vllm_config) // uncompressed_crop_tokens(config)
        self.visionzip = ClipSelection(self.vision_tower, self.reducer, max_crops)  # type: ignore[attr-defined]

    def _parse_and_validate_image_input(self, **kwargs: object) -> Any:
        reject_embeddings(kwargs, self.architecture)
        return super()._parse_and_validate_image_input(**kwargs)  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# M-RoPE offsets carried with the embeddings (Qwen)
# --------------------------------------------------------------------------------------------


def grid_coordinates(index: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(k,) flat indices into a (t, h, w) grid of merged tokens -> (3, k) coordinates (t, h, w)."""
    _, h, w = grid
    return torch.stack([index // (h * w), (index // w) % h, index % w])


def attach_positions(features: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
    """(k, C) embedding rows and the (3, k) coordinates of the tokens they stand for -> (k, C + 6)."""
    coords = coordinates.to(torch.int64).T
    channels = torch.cat([coords // _RADIX, coords % _RADIX], dim=1)
    return torch.cat([features, channels.to(features.dtype)], dim=1)


def detach_positions(embeddings: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`attach_positions` for rows of ``width + 6`` channels: ((n, width) rows,
    (3, n) int64 coordinates). Rows of ``width`` channels (videos, never reduced) get zero offsets."""
    n = embeddings.shape[0]
    if embeddings.shape[-1] == width:
        return embeddings, torch.zeros(3, n, dtype=torch.int64, device=embeddings.device)
    if embeddings.shape[-1] != width + POSITION_CHANNELS:
        raise RuntimeError(
            f"VisionZip: an image embedding of {embeddings.shape[-1]} channels reached the language model; "
            f"expected {width} or {width + POSITION_CHANNELS}"
        )
    channels = embeddings[:, width:].round().to(torch.int64)
    coords = channels[:, :3] * _RADIX + channels[:, 3:]
    return embeddings[:, :width], coords.T


def full_attention_block(visual: torch.nn.Module) -> int:
    """Index of the block scored: the last full-attention block (Qwen2.5-VL windows the others)."""
    full: Optional[Sequence[int]] = getattr(visual, "fullatt_block_indexes", None)
    return int(full[-1]) if full else len(visual.blocks) - 1
