"""VisToG (arXiv 2411.17773, "Efficient Multi-modal Large Language Models via Visual Token Grouping"):
M learnable semantic tokens run through a frozen vision tower beside the image tokens with isolated
attention, then a grouping layer assigns every patch to one semantic token and pools, so the language
model receives M tokens per image. No public code or weights exist; which parts the paper states and
which follow GroupViT's grouping block is docs/vistog.md "Stated and inferred".

    >>> module = VisToG(hidden_size=1024, num_tokens=64)
    >>> res = module(tower, pixel_values, feature_layer=-2)   # res.tokens: (B, 64, 1024)

Pieces, top to bottom:

- :class:`GroupingBlock`: the grouping layer (norms, q / k / v, the hard assignment and pooling of
  ``visionzip_kernels.group_pool`` with its straight-through gradient, projection, residual, MLP).
- :class:`VisToG`: semantic tokens + grouping block; ``save`` / ``load``.
- Isolated attention two ways: :func:`isolation_mask` / :func:`masked_forward` (one boolean mask,
  every layer re-run; for tests) and :class:`SideCar` (the tower runs unmodified, with its own
  attention implementation; per layer, the semantic tokens attend to that layer's captured keys and
  values with the layer's own weights).

The towers are read through the attribute layout transformers' CLIP / SigLIP vision models share
(``embeddings``, optional ``pre_layrnorm``, ``encoder.layers[i]`` with ``layer_norm1``,
``self_attn.{q,k,v,out}_proj``, ``layer_norm2``, ``mlp``); nothing here imports transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import feature_layer_depth
from ..ops.group_pool import group_pool

__all__ = [
    "GroupingBlock",
    "GroupingResult",
    "SideCar",
    "TowerParts",
    "VisToG",
    "gumbel_noise",
    "isolation_mask",
    "masked_forward",
    "tower_parts",
]

_FORMAT = "visionzip_kernels.VisToG/1"


# --------------------------------------------------------------------------------------------
# Grouping math
# --------------------------------------------------------------------------------------------


def gumbel_noise(like: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard Gumbel samples shaped like ``like``: -log(E), E ~ Exp(1) (as F.gumbel_softmax)."""
    return -torch.empty_like(like).exponential_(generator=generator).log()


@dataclass
class GroupingResult:
    """What the grouping layer gives for B images.

    tokens: (B, M, C) the rows the language model receives (before its projector).
    labels: (B, N) int64, the semantic token each patch was assigned to.
    counts: (B, M) int64, patches per semantic token.
    logits: (B, M, N) the assignment logits (Gumbel-perturbed and divided by tau in training).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    counts: torch.Tensor
    logits: torch.Tensor


class GroupingBlock(nn.Module):
    """The grouping layer (GroupViT's assign block without its token-mixing MLP and pre-assign cross
    attention, docs/vistog.md "Stated and inferred"): s = LN(tokens), x = LN(patches);
    logits = q(s) k(x)^T / sqrt(C); hard assignment over the semantic axis; pooled = mean of v(x)
    per group; out = proj(pooled) + s; out += MLP(LN(out)).

    Args:
        hidden_size: C.
        mlp_ratio: hidden width of the MLP, in units of C.
        eps: added to every group count (GroupViT's assign_eps is 1).
        layer_norm_eps: of the three LayerNorms.
    """

    def __init__(self, hidden_size: int, *, mlp_ratio: float = 4.0, eps: float = 1.0, layer_norm_eps: float = 1e-5):
        super().__init__()
        c = hidden_size
        self.eps = eps
        self.norm_tokens = nn.LayerNorm(c, eps=layer_norm_eps)
        self.norm_patches = nn.LayerNorm(c, eps=layer_norm_eps)
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.proj = nn.Linear(c, c)
        self.norm_mlp = nn.LayerNorm(c, eps=layer_norm_eps)
        hidden = int(round(c * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(c, hidden), nn.GELU(), nn.Linear(hidden, c))

    def forward(
        self, tokens: torch.Tensor, patches: torch.Tensor, *, noise: Optional[torch.Tensor] = None, tau: float = 1.0
    ) -> GroupingResult:
        """tokens (B, M, C) semantic tokens, patches (B, N, C); ``noise`` (B, M, N) is added to the
        logits before dividing by ``tau`` (Gumbel training)."""
        s = self.norm_tokens(tokens)
        x = self.norm_patches(patches)
        logits = self.q_proj(s) @ self.k_proj(x).transpose(1, 2) / math.sqrt(s.shape[-1])
        if noise is not None:
            logits = (logits + noise) / tau
        # hard assignment and pooling, GroupViT's straight-through gradient (docs/spec.md "Group pool")
        pooled = group_pool(logits, self.v_proj(x), eps=self.eps, return_labels=True)
        out = self.proj(pooled.output) + s
        out = out + self.mlp(self.norm_mlp(out))
        return GroupingResult(out, pooled.labels, pooled.counts, logits)


# --------------------------------------------------------------------------------------------
# Towers
# --------------------------------------------------------------------------------------------


@dataclass
class TowerParts:
    """The pieces of a CLIP-like vision tower the two isolation paths use.

    embeddings: pixels -> (B, N, C) image tokens with position embeddings (CLS first if any).
    pre_norm: the per-token norm applied before the encoder (CLIP's pre_layrnorm), or None.
    layers: the encoder layers.
    has_cls: token 0 is a CLS token.
    """

    embeddings: nn.Module
    pre_norm: Optional[nn.Module]
    layers: nn.ModuleList
    has_cls: bool


_LAYER_PARTS = ("layer_norm1", "self_attn", "layer_norm2", "mlp")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "scale")


def tower_parts(tower: nn.Module) -> TowerParts:
    """The :class:`TowerParts` of a transformers CLIP / SigLIP vision model (or its inner
    ``vision_model``). TypeError naming what is missing otherwise."""
    root = getattr(tower, "vision_model", tower)
    embeddings = getattr(root, "embeddings", None)
    layers = getattr(getattr(root, "encoder", None), "layers", None)
    if embeddings is None or not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(
            f"VisToG: tower must be a CLIP-like vision model with .embeddings and .encoder.layers; "
            f"got {type(tower).__name__}"
        )
    for i, layer in enumerate(layers):
        missing = [p for p in _LAYER_PARTS if not hasattr(layer, p)]
        attn = getattr(layer, "self_attn", None)
        missing += [f"self_attn.{p}" for p in _ATTN_PARTS if attn is not None and not hasattr(attn, p)]
        if missing:
            raise TypeError(f"VisToG: encoder layer {i} ({type(layer).__name__}) lacks {', '.join(missing)}")
    return TowerParts(embeddings, getattr(root, "pre_layrnorm", None), layers, hasattr(embeddings, "class_embedding"))


def _check_depth(depth: int, layers: nn.ModuleList) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= len(layers):
        raise ValueError(f"depth must be an int in 1..{len(layers)} (encoder layers to run); got {depth!r}")
    return depth


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def _semantic_step(
    layer: nn.Module, s: torch.Tensor, k_img: torch.Tensor, v_img: torch.Tensor, semantic_attention: bool
) -> torch.Tensor:
    """One pre-LN encoder layer for the semantic tokens s (B, M, C): their queries attend to the image
    tokens' keys / values of this layer (B, N, C) (and to their own when ``semantic_attention``).
    Sub-modules are called through ``.forward`` so that forward hooks on them (an integration's
    captures of this layer's q / k) see only the tower's own pass."""
    attn = layer.self_attn
    h = layer.layer_norm1.forward(s)
    q, k, v = attn.q_proj.forward(h), k_img, v_img
    if semantic_attention:
        k = torch.cat([k_img, attn.k_proj.forward(h)], dim=1)
        v = torch.cat([v_img, attn.v_proj.forward(h)], dim=1)
    heads = attn.num_heads
    o = F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads), scale=attn.scale)
    s = s + attn.out_proj.forward(o.transpose(1, 2).reshape(s.shape))
    return s + layer.mlp.forward(layer.layer_norm2.forward(s))


class SideCar:
    """Isolated attention without touching the tower: a context manager whose forward hooks capture,
    for each of the first ``depth`` encoder layers, the image tokens' key and value projections, and
    when that layer has run, advance the semantic tokens by one step of the same layer (its own
    weights; queries over [image keys; semantic keys]). The tower itself runs unmodified, with its
    own attention implementation (SDPA, FlashAttention, eager): its outputs are bit-identical to a
    run without the side-car, and they need no autograd graph (only the semantic tokens' path does).

        >>> with SideCar(tower, module.semantic_tokens, depth=23) as car:
        ...     tower(pixel_values)
        >>> car.output   # (B, M, C) semantic tokens after layer 23;  car.image: the image tokens there

    Attributes after the run: ``states`` (depth + 1 tensors (B, M, C): entering layer 1, then after
    each layer), ``output`` (= states[-1]), ``image`` (the tower's own (B, N, C) output of layer
    ``depth``). One layer's keys / values are held at a time.

    Args:
        tower: a CLIP-like vision model (:func:`tower_parts`).
        tokens: (M, C) semantic tokens (cast to the tower's dtype; gradients flow back to them).
        depth: encoder layers to run the semantic tokens through, 1..num_layers.
        semantic_attention: semantic tokens also attend to each other (not only to the image tokens).
    """

    def __init__(self, tower: nn.Module, tokens: torch.Tensor, *, depth: int, semantic_attention: bool = True):
        self.parts = tower_parts(tower)
        if tokens.dim() != 2 or tokens.shape[1] != self.parts.layers[0].self_attn.q_proj.in_features:
            raise ValueError(
                f"tokens must be (M, C) with C = the tower's hidden size "
                f"{self.parts.layers[0].self_attn.q_proj.in_features}; got {tuple(tokens.shape)}"
            )
        self.tokens, self.depth = tokens, _check_depth(depth, self.parts.layers)
        self.semantic_attention = semantic_attention
        self.states: list[torch.Tensor] = []
        self.image: Optional[torch.Tensor] = None
        self._kv: dict[tuple[int, str], torch.Tensor] = {}
        self._hooks: list[Any] = []

    @property
    def output(self) -> torch.Tensor:
        if len(self.states) != self.depth + 1:
            raise RuntimeError("SideCar: the tower has not run its first `depth` layers inside the context")
        return self.states[-1]

    def _store(self, index: int, name: str):
        def hook(_mod: nn.Module, _args: Any, out: torch.Tensor) -> None:
            self._kv[(index, name)] = out

        return hook

    def _advance(self, index: int):
        def hook(mod: nn.Module, _args: Any, out: Any) -> None:
            k_img, v_img = self._kv.pop((index, "k")), self._kv.pop((index, "v"))
            if index == 0:  # (re)start: one tower call per context use, or a fresh one
                s = self.tokens.to(k_img.dtype)
                if self.parts.pre_norm is not None:
                    s = self.parts.pre_norm.forward(s)
                self.states = [s.expand(k_img.shape[0], -1, -1)]
            self.states.append(_semantic_step(mod, self.states[-1], k_img, v_img, self.semantic_attention))
            if index == self.depth - 1:
                self.image = out[0] if isinstance(out, (tuple, list)) else out

        return hook

    def __enter__(self) -> "SideCar":
        for i, layer in enumerate(self.parts.layers[: self.depth]):
            self._hooks.append(layer.self_attn.k_proj.register_forward_hook(self._store(i, "k")))
            self._hooks.append(layer.self_attn.v_proj.register_forward_hook(self._store(i, "v")))
            self._hooks.append(layer.register_forward_hook(self._advance(i)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._kv.clear()


def isolation_mask(
    n_image: int, n_semantic: int, *, isolate: bool = True, semantic_attention: bool = True,
    device: Union[torch.device, str, None] = None,
) -> torch.Tensor:
    """(L, L) boolean mask, True = may attend (SDPA's convention), over [image tokens; semantic tokens],
    L = n_image + n_semantic. Isolated: image rows see image columns only; semantic rows see the image
    columns, and the semantic ones when ``semantic_attention``. ``isolate=False`` lets image tokens see
    the semantic ones too (the negative control: their features drift)."""
    for name, v in (("n_image", n_image), ("n_semantic", n_semantic)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    n = n_image + n_semantic
    mask = torch.ones(n, n, dtype=torch.bool, device=device)
    if isolate:
        mask[:n_image, n_image:] = False
    if not semantic_attention:
        mask[n_image:, n_image:] = False
    return mask


def masked_forward(
    tower: nn.Module, pixel_values: torch.Tensor, tokens: torch.Tensor, *, depth: Optional[int] = None,
    isolate: bool = True, semantic_attention: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Isolated attention by one mask: [image tokens; semantic tokens] through the first ``depth``
    encoder layers (default all) with :func:`isolation_mask`. Reference path for tests: it re-runs the
    layers on N + M tokens, with a boolean mask for SDPA (eager: the additive form); attention
    implementations without mask support (FlashAttention) are refused.

    Returns (image states, semantic states): depth + 1 tensors each, (B, N, C) and (B, M, C),
    entering layer 1 and after each layer (the layout of ``hidden_states`` of the tower's output).
    """
    parts = tower_parts(tower)
    depth = len(parts.layers) if depth is None else _check_depth(depth, parts.layers)
    impl = getattr(getattr(parts.layers[0].self_attn, "config", None), "_attn_implementation", "eager")
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"masked_forward needs an sdpa or eager tower (a boolean / additive mask); got {impl!r}")
    x = parts.embeddings(pixel_values)
    b, n, c = x.shape
    if tokens.dim() != 2 or tokens.shape[1] != c:
        raise ValueError(f"tokens must be (M, C) with C = {c}; got {tuple(tokens.shape)}")
    h = torch.cat([x, tokens.to(x.dtype).expand(b, -1, -1)], dim=1)
    if parts.pre_norm is not None:
        h = parts.pre_norm(h)
    mask = isolation_mask(n, tokens.shape[0], isolate=isolate, semantic_attention=semantic_attention,
                          device=h.device)[None, None]
    if impl == "eager":
        mask = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill(~mask, torch.finfo(h.dtype).min)
    states = [h]
    for layer in parts.layers[:depth]:
        out = layer(states[-1], mask)
        states.append(out[0] if isinstance(out, (tuple, list)) else out)
    return [s[:, :n] for s in states], [s[:, n:] for s in states]


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


class VisToG(nn.Module):
    """VisToG's trainable part: ``num_tokens`` semantic tokens and the grouping layer.

    Args:
        hidden_size: C, the vision tower's width.
        num_tokens: M, semantic tokens = rows per image the language model receives.
        semantic_attention: semantic tokens attend to each other in the tower (besides the image tokens).
        gumbel: in training mode, Gumbel noise on the assignment logits (straight-through either way).
        tau: Gumbel temperature (the logits are divided by it after the noise).
        eps: added to every group count.
        mlp_ratio / layer_norm_eps: of the grouping layer.

    No trained VisToG weights exist anywhere: train before use (examples/vistog_digits.py).
    """

    def __init__(
        self, hidden_size: int, num_tokens: int = 64, *, semantic_attention: bool = True, gumbel: bool = True,
        tau: float = 1.0, eps: float = 1.0, mlp_ratio: float = 4.0, layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("num_tokens", num_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if not (isinstance(tau, (int, float)) and tau > 0):
            raise ValueError(f"tau must be a positive number; got {tau!r}")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps must be a positive number (it keeps an empty group finite); got {eps!r}")
        self._config = dict(hidden_size=hidden_size, num_tokens=num_tokens, semantic_attention=bool(semantic_attention),
                            gumbel=bool(gumbel), tau=float(tau), eps=float(eps), mlp_ratio=float(mlp_ratio),
                            layer_norm_eps=float(layer_norm_eps))
        self.semantic_tokens = nn.Parameter(torch.empty(num_tokens, hidden_size))
        nn.init.trunc_normal_(self.semantic_tokens, std=0.02)  # GroupViT's group-token init
        self.grouping = GroupingBlock(hidden_size, mlp_ratio=mlp_ratio, eps=eps, layer_norm_eps=layer_norm_eps)

    @property
    def num_tokens(self) -> int:
        return self._config["num_tokens"]

    @property
    def hidden_size(self) -> int:
        return self._config["hidden_size"]

    @property
    def semantic_attention(self) -> bool:
        return self._config["semantic_attention"]

    def config(self) -> dict:
        """The constructor arguments (what :meth:`save` stores beside the weights)."""
        return dict(self._config)

    def assignment_parameters(self) -> list[nn.Parameter]:
        """The parameters that decide the assignment: semantic tokens, the two input norms, q and k
        (frozen at initialisation in the demo's "frozen grouping" ablation)."""
        g = self.grouping
        return [self.semantic_tokens, *g.norm_tokens.parameters(), *g.norm_patches.parameters(),
                *g.q_proj.parameters(), *g.k_proj.parameters()]

    def group(self, tokens: torch.Tensor, patches: torch.Tensor) -> GroupingResult:
        """The grouping layer on the semantic tokens' states (B, M, C) and the patches (B, N, C) of
        the feature layer (inputs are cast to the module's dtype). Gumbel noise in training mode."""
        c, m = self.hidden_size, self.num_tokens
        if tokens.dim() != 3 or tokens.shape[1:] != (m, c):
            raise ValueError(f"tokens must be (B, {m}, {c}) semantic-token states; got {tuple(tokens.shape)}")
        if patches.dim() != 3 or patches.shape[0] != tokens.shape[0] or patches.shape[2] != c:
            raise ValueError(f"patches must be (B={tokens.shape[0]}, N, {c}); got {tuple(patches.shape)}")
        dtype = self.semantic_tokens.dtype
        tokens, patches = tokens.to(dtype), patches.to(dtype)
        noise = None
        if self.training and self._config["gumbel"]:
            noise = gumbel_noise(patches.new_empty(tokens.shape[0], m, patches.shape[1]))
        return self.grouping(tokens, patches, noise=noise, tau=self._config["tau"])

    def forward(self, tower: nn.Module, pixel_values: torch.Tensor, *, feature_layer: int = -2) -> GroupingResult:
        """Run ``tower`` unmodified with the semantic tokens in a :class:`SideCar` up to
        ``hidden_states[feature_layer]``, then group that layer's patches (CLS excluded)."""
        parts = tower_parts(tower)
        depth = feature_layer_depth("feature_layer", feature_layer, len(parts.layers))
        with SideCar(tower, self.semantic_tokens, depth=depth, semantic_attention=self.semantic_attention) as car:
            tower(pixel_values)
        return self.group(car.output, car.image[:, int(parts.has_cls):])

    def save(self, path: Union[str, Path]) -> None:
        """Write config and weights to one file (``torch.load(..., weights_only=True)`` reads it)."""
        torch.save({"format": _FORMAT, "config": self.config(), "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path: Union[str, Path], map_location: Union[str, torch.device, None] = "cpu") -> "VisToG":
        """A module written by :meth:`save`."""
        blob = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a VisToG file written by VisToG.save (format {_FORMAT!r})")
        module = cls(**blob["config"])
        module.load_state_dict(blob["state_dict"])
        return module

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._config.items())
