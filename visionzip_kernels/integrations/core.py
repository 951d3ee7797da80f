"""The method- and engine-neutral core of the integrations (transformers, vLLM).

An integration captures the selection layer of a vision tower (its hidden states and its per-head
queries and keys), turns the queries and keys into token scores without an N x N matrix
(docs/spec.md "Scores"), and hands a :class:`Selection` to a *reducer*: the token-reduction method,
which returns a :class:`Reduction` (the rows the language model receives, and the token each row
stands for, which M-RoPE positions and layouts need). :class:`VisionZip` is the reducer of
docs/spec.md "Compress"; another method is another :class:`Reducer`. A method with learned tokens
that ride through the tower beside the image tokens (:class:`VisToGReducer`, docs/vistog.md) declares
them with :meth:`Reducer.side_car_tokens`; an integration that supports it runs them with isolated
attention and hands their states at the selection layer in :attr:`Selection.side_car`.

Nothing here imports transformers or vLLM.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .. import _backends
from .._validation import compute_dtype
from ..methods.vistog import VisToG as VisToGModule
from ..ops.compress import CompressResult, compress, default_contextual
from ..ops.scores import cls_scores, received_scores

__all__ = [
    "ANYRES_LAYOUTS",
    "Capture",
    "Reducer",
    "Reduction",
    "Selection",
    "SideCarTokens",
    "VisToGReducer",
    "VisionZip",
    "anyres_order",
    "anyres_rows",
    "expand_runs",
    "mean_keys",
    "merge_unit_mean",
    "merged_unit_selection",
    "official_anyres_order",
    "replay_compress",
    "selection_scores",
    "split_heads",
]


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, H * d) projections -> (B, H, N, d) per-head queries or keys."""
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def selection_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    *,
    has_cls: bool,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Token scores of a layer from its per-head q, k (B, H, N, d): the CLS row of the attention
    summed over heads (CLS towers), or the attention each token receives (no CLS); (B, N) float32
    (float64 for float64 inputs). Never materialises the N x N matrix."""
    if has_cls:
        return cls_scores(q[:, :, 0], k, scale=scale)
    return received_scores(q, k, scale=scale, cu_seqlens=cu_seqlens)


def mean_keys(k: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) per-head keys -> (B, N, d) averaged over heads, the contextual-merge metric."""
    return k.to(compute_dtype(k.dtype)).mean(dim=1)


def merge_unit_mean(x: torch.Tensor, unit: int) -> torch.Tensor:
    """Mean over consecutive groups of ``unit`` rows along dim 0 (Qwen2-VL's 2x2 merge units):
    (S, ...) -> (S / unit, ...)."""
    return x.view(x.shape[0] // unit, unit, *x.shape[1:]).mean(dim=1)


def merged_unit_selection(
    q_rot: torch.Tensor,
    k_rot: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    cu_seqlens: Optional[torch.Tensor],
    unit: int,
    order: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and keys per merge unit of a patch-merging tower (Qwen2-VL / Qwen2.5-VL), all images
    packed in one sequence of S patches.

    q_rot, k_rot: (S, H, d) the queries and keys the scored block attends with (RoPE applied);
    k: (S, H, d) its keys before RoPE (the merge metric: a rotation would make similarity
    positional); cu_seqlens: (images + 1,) image boundaries (each image attends within itself);
    unit: patches per merge unit (consecutive rows); order: (U,) optional reordering of the units
    (Qwen2.5-VL: undo its window order). Returns (U,) received-attention scores summed over the
    given heads, averaged over each unit, and (U, d) keys averaged over the heads and the unit.
    Both are linear in the heads, so tensor-parallel ranks holding a share of the heads combine
    theirs by summing (scores) and averaging (keys).
    """
    scores = selection_scores(q_rot.transpose(0, 1)[None], k_rot.transpose(0, 1)[None], scale,
                              has_cls=False, cu_seqlens=cu_seqlens)[0]
    keys = mean_keys(k.transpose(0, 1)[None])[0]
    unit_scores, unit_keys = merge_unit_mean(scores, unit), merge_unit_mean(keys, unit)
    if order is not None:
        unit_scores, unit_keys = unit_scores[order], unit_keys[order]
    return unit_scores, unit_keys


def expand_runs(
    length: int, runs: Sequence[tuple[int, int]], full: Sequence[int], order: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Where each token of a sequence whose image runs hold reduced tokens sits in the expanded
    sequence (every run back at its full length): the M-RoPE gather index.

    length: tokens of the reduced sequence; runs: [start, end) of each image run in it; full: the
    run's token count without reduction; order: per run, the index within the full run of each of
    its reduced tokens (a :class:`Reduction`'s ``kept_indices``). Returns (length,) int64: text
    tokens map to themselves (shifted), the r-th token of run i to token ``order[i][r]`` of run i.
    """
    device = order[0].device if len(order) else None
    pieces, cursor, shift = [], 0, 0
    for (start, end), n, idx in zip(runs, full, order):
        pieces += [torch.arange(cursor, start, device=device) + shift, idx.to(torch.int64) + start + shift]
        shift += n - (end - start)
        cursor = end
    pieces.append(torch.arange(cursor, length, device=device) + shift)
    return torch.cat(pieces)


class Capture:
    """Temporary forward hooks that store module outputs (and optionally inputs) by name: how the
    integrations read a selection layer without changing the tower's code.

        with Capture() as cap:
            cap.output(layer.q_proj, "q")
            cap.inputs(layer.attn, "attn_in")      # (args, kwargs) of the call
            tower(pixels)
        q = cap["q"]
    """

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

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __getitem__(self, name: str) -> Any:
        if name not in self.values:
            raise RuntimeError(
                f"VisionZip: the vision tower did not run the hooked module ({name}); "
                "this version of the model code is not supported"
            )
        return self.values[name]


def replay_compress(result: CompressResult, values: torch.Tensor) -> torch.Tensor:
    """The rows ``compress`` would have made of ``values`` (B, N, C') with the choices of ``result``
    (docs/spec.md "Contextual merging"): the dominant rows, then each target plus the mean of its
    members; (B, k, C') in values' dtype. For tensors row-aligned with the compressed ones (Qwen3-VL's
    deepstack features), which must go through the same selection and merge."""
    b, n, c = values.shape
    dom, ctx, tmap = result.dominant_indices, result.contextual_indices, result.token_map
    d, cx = dom.shape[1], ctx.shape[1]
    acc = values.to(compute_dtype(values.dtype))
    rows = [acc.gather(1, dom.unsqueeze(-1).expand(b, d, c))]
    if cx:
        is_target = torch.zeros(b, n, dtype=torch.bool, device=values.device).scatter_(1, ctx, True)
        member = (tmap >= d) & ~is_target
        label = (tmap - d).clamp_min(0)
        sums = acc.new_zeros(b, cx, c).scatter_add_(1, label.unsqueeze(-1).expand(b, n, c), acc * member.unsqueeze(-1))
        counts = acc.new_zeros(b, cx).scatter_add_(1, label, member.to(acc.dtype))
        rows.append(acc.gather(1, ctx.unsqueeze(-1).expand(b, cx, c)) + sums / counts.clamp_min(1).unsqueeze(-1))
    return torch.cat(rows, dim=1).to(values.dtype)


def official_anyres_order(
    dominant_indices: torch.Tensor, k: int, grid: tuple[int, int], side: int, *, has_cls: bool = True
) -> torch.Tensor:
    """VisionZip's own LLaVA-NeXT layout of one image (the official ``restore_image_features_sorted``):
    the order of its reduced rows, as indices into the crops' rows flattened ((1 + P) * k).

    ``dominant_indices`` (1 + P, D): per crop (the base crop first, then the P sub-crops in processor
    order, row-major over the ``grid`` = (rows, cols)) the ascending token indices of its dominant
    rows, CLS (0) first when ``has_cls``; each crop's k rows are its D dominant rows then its
    contextual rows; ``side`` patches per crop side. The sequence is: the base crop's k rows as they
    are; the sub-crops' non-CLS dominant rows placed on the full (rows x side) x (cols x side) patch
    grid and read in raster order of that grid; the sub-crops' CLS rows; the sub-crops' contextual
    rows, crop by crop. No image_newline, no unpadding: (1 + P) * k rows.
    """
    crops, d = dominant_indices.shape
    rows, cols = grid
    if crops - 1 != rows * cols:
        raise ValueError(f"official layout: {crops - 1} sub-crops do not fill a {rows} x {cols} grid")
    dev = dominant_indices.device
    first = 1 if has_cls else 0  # row 0 of a CLS crop is the CLS token
    sub = torch.arange(1, crops, device=dev).unsqueeze(1)
    patch = dominant_indices[1:, first:] - first  # raster index inside the crop
    gy = (sub - 1) // cols * side + patch // side
    gx = (sub - 1) % cols * side + patch % side
    spatial = (sub * k + torch.arange(first, d, device=dev)).reshape(-1)[torch.argsort((gy * cols * side + gx).reshape(-1))]
    cls_rows = (sub * k).reshape(-1) if has_cls else sub.new_zeros(0)
    contextual = (sub * k + torch.arange(d, k, device=dev)).reshape(-1)
    return torch.cat([torch.arange(k, device=dev), spatial, cls_rows, contextual])


#: Layouts of an anyres image's reduced crops (LLaVA-NeXT, OneVision): VisionZip's own ("official",
#: :func:`official_anyres_order`) and crop after crop with one image_newline ("per_crop").
ANYRES_LAYOUTS = ("official", "per_crop")


def anyres_rows(crops: int, k: int, layout: str) -> int:
    """Rows an anyres image of ``crops`` crops (base included) becomes, k reduced rows per crop:
    (1 + P) k in the official layout; crop after crop plus one image_newline otherwise (also a
    single crop in the official layout)."""
    if layout == "official" and crops > 1:
        return crops * k
    return crops * k + 1


def anyres_order(
    layout: str, crops: int, k: int, dominant_indices: Optional[torch.Tensor], grid: tuple[int, int], side: int,
    *, has_cls: bool = True, device: Optional[torch.device] = None,
) -> torch.Tensor:
    """The order of one anyres image's rows in ``layout`` (:func:`anyres_rows` of them), as indices
    into its crops' reduced rows flattened ((crops * k) rows) followed by one image_newline row (index
    crops * k). ``dominant_indices`` (crops, D), ``grid`` (rows, cols) and ``side`` (patches per crop
    side) are what :func:`official_anyres_order` needs; the official layout of several crops needs
    them, the others do not."""
    if layout not in ANYRES_LAYOUTS:
        raise ValueError(f"layout must be one of {ANYRES_LAYOUTS}; got {layout!r}")
    if layout == "official" and crops > 1:
        if dominant_indices is None:
            raise NotImplementedError("the official anyres layout needs the dominant indices of each crop")
        return official_anyres_order(dominant_indices, k, grid, side, has_cls=has_cls)
    return torch.arange(crops * k + 1, device=device)


@dataclass
class Selection:
    """What a tower's selection layer gives a reducer, for B images (or crops, or frames).

    hidden: (B, N, C) the rows to reduce (the layer's output, or a merger's output for Qwen).
    scores: (B, N) token scores (:func:`selection_scores`).
    keys: (B, N, d) the merge metric (:func:`mean_keys`).
    has_cls: token 0 is a CLS token.
    side_car: (B, M, C) states at the selection layer of the reducer's side-car tokens
        (:meth:`Reducer.side_car_tokens`), or None when it declares none.
    """

    hidden: torch.Tensor
    scores: torch.Tensor
    keys: torch.Tensor
    has_cls: bool
    side_car: Optional[torch.Tensor] = None


@dataclass
class SideCarTokens:
    """Learned tokens a reducer runs through the vision tower beside the image tokens, with isolated
    attention (image tokens never see them; docs/vistog.md "Isolated attention").

    tokens: (M, C) the tokens as they enter the encoder (C = the tower's width).
    attend_each_other: they attend to each other too, not only to the image tokens.
    """

    tokens: torch.Tensor
    attend_each_other: bool = True


@dataclass
class Reduction:
    """A reducer's result for B images of N tokens.

    features: (B, T, C) the rows the language model receives (before a projector, if any).
    kept_indices: (B, T) int64, the token each row stands for (for VisionZip: dominant tokens in
        ascending index, then the contextual targets): the order M-RoPE positions are gathered in;
        -1 for a row that stands for no single token (a VisToG group).
    details: the method's own record (VisionZip: its CompressResult; VisToG: its GroupingResult),
        or None.
    """

    features: torch.Tensor
    kept_indices: torch.Tensor
    details: Any = None


class Reducer(ABC):
    """A token-reduction method for the integrations: ``tokens`` says how many rows an image of
    ``n`` tokens becomes (what processors emit placeholders for), ``reduce`` computes them."""

    #: Name used in messages ("VisionZip").
    name: str = "reducer"

    @abstractmethod
    def tokens(self, n: int) -> int:
        """Rows an image (crop, frame group) of ``n`` tokens becomes."""

    @abstractmethod
    def reduce(self, selection: Selection) -> Reduction:
        """The reduced rows of ``selection``; T = ``tokens(N)``."""

    def replay(self, reduction: Reduction, values: torch.Tensor) -> torch.Tensor:
        """The rows ``reduce`` would have made of ``values`` (B, N, C'), row-aligned with the reduced
        hidden states, with the same choices (Qwen3-VL's deepstack features need it)."""
        raise NotImplementedError(f"{self.name} cannot apply its choices to other tensors")

    def processor_hint(self) -> str:
        """How to make a processor emit ``tokens`` placeholders (appended to mismatch errors)."""
        return ""

    def side_car_tokens(self) -> Optional[SideCarTokens]:
        """Tokens to run beside the image tokens through the tower up to the selection layer (their
        states arrive in ``Selection.side_car``); None (the default): the selection layer suffices."""
        return None


class VisionZip(Reducer):
    """VisionZip (docs/spec.md "Compress"): ``budget`` tokens per image, ``contextual`` of them
    merged (default ``budget * 5 // 32``), the rest dominant; an image of at most ``budget`` tokens
    is kept whole, in order.

    Args:
        budget: k, tokens kept per image (crop, frame group).
        dominant / contextual: the split of k (D + Cx = k); at most one of them is needed.
        backend: compress backend (see ``visionzip_kernels.available_backends``), None = fastest.
    """

    name = "VisionZip"

    def __init__(
        self, budget: int = 64, *, dominant: Optional[int] = None, contextual: Optional[int] = None,
        backend: Optional[str] = None,
    ) -> None:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
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
        _backends.check_name(backend)
        self.budget, self.contextual, self.backend = budget, contextual, backend

    @property
    def dominant(self) -> int:
        return self.budget - self.contextual

    def tokens(self, n: int) -> int:
        return min(self.budget, n)

    def reduce(self, selection: Selection) -> Reduction:
        hidden = selection.hidden
        b, n, _ = hidden.shape
        if n <= self.budget:  # nothing to drop: every token, in order
            idx = torch.arange(n, device=hidden.device).expand(b, n)
            result = CompressResult(hidden, idx, idx[:, :0], idx)
            return Reduction(hidden, idx, result)
        result = compress(
            hidden, selection.scores, self.budget, keys=selection.keys, contextual=self.contextual,
            has_cls=selection.has_cls, backend=self.backend, return_indices=True,
        )
        kept = torch.cat([result.dominant_indices, result.contextual_indices], dim=1)
        return Reduction(result.output, kept, result)

    def replay(self, reduction: Reduction, values: torch.Tensor) -> torch.Tensor:
        return replay_compress(reduction.details, values)

    def processor_hint(self) -> str:
        return (
            "The processor that built these inputs was not patched for VisionZip: use "
            f"apply_visionzip_processor(processor, budget={self.budget}) or "
            f"apply_visionzip(model, budget={self.budget}, processor=processor)."
        )

    def __repr__(self) -> str:
        return (f"VisionZip(budget={self.budget}, dominant={self.dominant}, contextual={self.contextual}, "
                f"backend={self.backend!r})")


class VisToGReducer(Reducer):
    """VisToG (docs/vistog.md): the ``module``'s semantic tokens run beside the image tokens through
    the tower (a side-car, isolated attention), then its grouping layer pools the selection layer's
    patches (CLS excluded) into M = ``module.num_tokens`` rows per image, whatever the image size.

    Args:
        module: a trained :class:`visionzip_kernels.methods.vistog.VisToG` (no trained weights are
            published: train it first). Its mode decides Gumbel noise (``module.eval()`` for inference).
    """

    name = "VisToG"

    def __init__(self, module: VisToGModule) -> None:
        if not isinstance(module, VisToGModule):
            raise TypeError(
                f"module must be a visionzip_kernels.methods.vistog.VisToG; got {type(module).__name__}"
            )
        self.module = module

    @property
    def num_tokens(self) -> int:
        return self.module.num_tokens

    def tokens(self, n: int) -> int:
        return self.module.num_tokens

    def side_car_tokens(self) -> SideCarTokens:
        return SideCarTokens(self.module.semantic_tokens, self.module.semantic_attention)

    def reduce(self, selection: Selection) -> Reduction:
        if selection.side_car is None:
            raise RuntimeError(
                "VisToG needs its semantic tokens' states (Selection.side_car): the integration did not run "
                "the side-car; this model family does not support VisToG"
            )
        patches = selection.hidden[:, 1:] if selection.has_cls else selection.hidden
        res = self.module.group(selection.side_car, patches)
        kept = torch.full(res.tokens.shape[:2], -1, dtype=torch.int64, device=res.tokens.device)
        return Reduction(res.tokens.to(selection.hidden.dtype), kept, res)

    def processor_hint(self) -> str:
        return (
            "The processor that built these inputs was not patched for VisToG: use "
            f"apply_vistog(model, module, processor=processor) or apply_vistog_processor(processor, module) "
            f"({self.num_tokens} per image)."
        )

    def __repr__(self) -> str:
        return f"VisToGReducer(num_tokens={self.num_tokens}, semantic_attention={self.module.semantic_attention})"
