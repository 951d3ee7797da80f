"""VisToG trained end to end on CPU with no download: digit mosaics, a tiny CLIP tower, an answer head.

Data: scikit-learn's ``load_digits`` (1797 8x8 images shipped inside the package), arranged as 16x16
mosaics of 2x2 quadrants, each a digit or blank. A question names a quadrant (0 top-left, 1 top-right,
2 bottom-left, 3 bottom-right); the answer is that quadrant's digit or "blank" (11 classes). Train and
test mosaics draw from disjoint digit images.

Steps: (1) pre-train a tiny CLIP vision tower built from a config (patch 2: 64 patches + CLS): every
patch token of its last layer names its quadrant's content (``--pretrain cls``: the pooled CLS output
names all four quadrants instead, see docs/vistog.md "Demo"); (2) freeze it; (3) for each way of handing tokens to an
answer head (a one-layer transformer reading [question; tokens]), train that head (and VisToG's
trainable parts, if any) and measure test accuracy:

    all        the 64 patch tokens of the feature layer
    vistog     VisToG, M semantic tokens (side-car isolated attention, grouping layer), trained
    frozen     VisToG with its assignment (semantic tokens, norms, q, k) frozen at initialisation
    avgpool    the 8x8 patch grid average-pooled to M cells (2x2 for M=4, 2x4 for M=8)
    visionzip  VisionZip at k = M (CLS attention of the feature layer, default contextual split)

plus group purity of VisToG: per image, the share of patches whose group's majority quadrant is their
own quadrant (1.0: every group lies inside one quadrant).

    python examples/vistog_digits.py                  # the full demo (~10 minutes on one core)
    python examples/vistog_digits.py --epochs 2 --train-images 1000 --no-save
    python examples/vistog_digits.py --pretrain cls --out benchmarks/results/vistog_digits_cls.json

Writes benchmarks/results/vistog_digits.json and vistog_digits_groups.png (unless --no-save). One
torch thread (faster than two on a loaded two-core machine), fixed seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from visionzip_kernels.integrations.core import VisionZip  # noqa: E402
from visionzip_kernels._validation import feature_layer_depth  # noqa: E402
from visionzip_kernels.methods.vistog import VisToG  # noqa: E402

BLANK = 10
CLASSES = 11
GRID = 8  # patches per side: 16 px / patch 2
QUADRANT_OF_PATCH = torch.tensor([(r // 4) * 2 + c // 4 for r in range(GRID) for c in range(GRID)])  # (64,)


@dataclass
class Config:
    """Everything a run depends on (stored in the results JSON)."""

    seed: int = 0
    train_images: int = 6000
    test_images: int = 2000
    blank_prob: float = 0.25
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    feature_layer: int = -2
    pretrain: str = "patches"
    pretrain_epochs: int = 6
    epochs: int = 8
    batch: int = 64
    lr: float = 2e-3
    tokens: tuple[int, ...] = (4, 8)
    methods: tuple[str, ...] = ("all", "vistog", "frozen", "avgpool", "visionzip")
    progress: bool = True
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def digit_split(seed: int, test_share: float = 0.25) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """load_digits split into disjoint train / test digit images: ((images (n, 8, 8) in [0, 1],
    labels (n,)), (same for test))."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_share)
    test, train = perm[:n_test], perm[n_test:]
    return (images[train], labels[train]), (images[test], labels[test])


def make_mosaics(
    images: torch.Tensor, labels: torch.Tensor, n: int, blank_prob: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """n mosaics: pixels (n, 1, 16, 16) in [-1, 1] and answers (n, 4) (digit, or BLANK) per quadrant."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(labels), (n, 4), generator=g)
    blank = torch.rand(n, 4, generator=g) < blank_prob
    tiles = images[pick].masked_fill(blank[..., None, None], 0.0)  # (n, 4, 8, 8)
    top = torch.cat([tiles[:, 0], tiles[:, 1]], dim=2)
    bottom = torch.cat([tiles[:, 2], tiles[:, 3]], dim=2)
    pixels = torch.cat([top, bottom], dim=1)[:, None] * 2 - 1
    return pixels, labels[pick].masked_fill(blank, BLANK)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def build_tower(cfg: Config) -> nn.Module:
    """A tiny CLIP vision tower from a config: 16x16 grey images, patch 2 (64 patches + CLS)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vc = CLIPVisionConfig(hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden, num_hidden_layers=cfg.layers,
                          num_attention_heads=cfg.heads, image_size=16, patch_size=2, num_channels=1)
    torch.manual_seed(cfg.seed)
    tower = CLIPVisionModel(vc)
    tower.set_attn_implementation("sdpa")
    return tower


class AnswerHead(nn.Module):
    """A stand-in for the language model: [question token; visual tokens + slot embeddings] through
    one pre-LN transformer layer, the answer read at the question token (CLASSES logits)."""

    def __init__(self, hidden: int, max_tokens: int, heads: int = 4):
        super().__init__()
        self.norm_in = nn.LayerNorm(hidden)
        self.slots = nn.Parameter(torch.zeros(max_tokens, hidden))
        nn.init.normal_(self.slots, std=0.02)
        self.question = nn.Embedding(4, hidden)
        self.body = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout=0.0, batch_first=True,
                                               norm_first=True)
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, CLASSES))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, C) -> (B, 4, CLASSES): the answer to each of the four questions."""
        b, t, c = tokens.shape
        x = self.norm_in(tokens) + self.slots[:t]
        q = self.question.weight.expand(b, 4, c)
        seq = torch.cat([q[:, :, None], x[:, None].expand(b, 4, t, c)], dim=2).reshape(b * 4, t + 1, c)
        return self.out(self.body(seq)[:, 0]).view(b, 4, CLASSES)


def answer_loss(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (..., CLASSES) logits against (...) answers."""
    return F.cross_entropy(logits.reshape(-1, CLASSES), answers.reshape(-1))


def _bar(total: int, desc: str, cfg: Config):
    if not cfg.progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _batches(n: int, batch: int, seed: Optional[int]) -> list[torch.Tensor]:
    order = torch.arange(n) if seed is None else torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(order.split(batch))


class PretrainHead(nn.Module):
    """The pre-training readout. ``patches``: every patch token of the last layer names its own
    quadrant's content (a dense, local objective); ``cls``: the pooled CLS output names all four."""

    def __init__(self, hidden: int, objective: str):
        super().__init__()
        if objective not in ("patches", "cls"):
            raise ValueError(f"pretrain objective must be 'patches' or 'cls'; got {objective!r}")
        self.objective = objective
        outputs = CLASSES if objective == "patches" else 4 * CLASSES
        self.net = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, outputs))

    def forward(self, out) -> torch.Tensor:
        """Tower output -> logits (B, P, CLASSES), P = 64 patches or 4 quadrants."""
        if self.objective == "patches":
            return self.net(out.last_hidden_state[:, 1:])
        return self.net(out.pooler_output).view(-1, 4, CLASSES)

    def targets(self, answers: torch.Tensor) -> torch.Tensor:
        return answers[:, QUADRANT_OF_PATCH] if self.objective == "patches" else answers


def fit(
    params: list[nn.Parameter], n: int, epochs: int, seed: int, loss_of: Callable[[torch.Tensor], torch.Tensor],
    desc: str, cfg: Config,
) -> None:
    """AdamW (weight decay 0.01) with a one-cycle schedule peaking at cfg.lr, over ``epochs`` passes of
    n items in shuffled batches of cfg.batch (pass e shuffled with seed + e); ``loss_of(indices)``."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    steps = epochs * len(_batches(n, cfg.batch, None))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps, pct_start=0.1)
    bar = _bar(steps, desc, cfg)
    for epoch in range(epochs):
        for idx in _batches(n, cfg.batch, seed + epoch):
            loss = loss_of(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()


def pretrain_tower(tower: nn.Module, pixels: torch.Tensor, answers: torch.Tensor, cfg: Config) -> PretrainHead:
    """Supervised pre-training with ``cfg.pretrain``'s objective (:class:`PretrainHead`, returned); the
    tower is left frozen (eval, no gradients)."""
    head = PretrainHead(cfg.hidden, cfg.pretrain)
    tower.train()
    fit(list(tower.parameters()) + list(head.parameters()), len(pixels), cfg.pretrain_epochs, cfg.seed * 1000,
        lambda idx: answer_loss(head(tower(pixels[idx])), head.targets(answers[idx])),
        f"pre-train tower ({cfg.pretrain})", cfg)
    tower.eval().requires_grad_(False)
    return head.eval()


# --------------------------------------------------------------------------------------------
# Token reducers (what the answer head sees)
# --------------------------------------------------------------------------------------------


def tower_features(tower: nn.Module, pixels: torch.Tensor, cfg: Config) -> dict[str, torch.Tensor]:
    """Feature layer of the frozen tower for a set of images, through the transformers integration's
    capture (the same as LLaVA): hidden (n, 65, C), CLS scores (n, 65), mean keys (n, 65, d)."""
    from visionzip_kernels.integrations.transformers._core import run_clip_like_tower, selection_layer

    layer = selection_layer(tower, cfg.feature_layer)
    out = {"hidden": [], "scores": [], "keys": []}
    with torch.no_grad():
        for idx in _batches(len(pixels), 256, None):
            _, sel = run_clip_like_tower(tower, pixels[idx], layer, has_cls=True)
            out["hidden"].append(sel.hidden)
            out["scores"].append(sel.scores)
            out["keys"].append(sel.keys)
    return {k: torch.cat(v) for k, v in out.items()}


def fixed_reducer(method: str, m: int) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """Tokens (B, T, C) from cached tower features, for the methods without trainable parts."""
    if method == "all":
        return lambda f: f["hidden"][:, 1:]
    if method == "avgpool":
        rows = 2 if m >= 2 else 1
        shape = (rows, m // rows)

        def avgpool(f: dict[str, torch.Tensor]) -> torch.Tensor:
            b, _, c = f["hidden"].shape
            grid = f["hidden"][:, 1:].transpose(1, 2).reshape(b, c, GRID, GRID)
            return F.adaptive_avg_pool2d(grid, shape).flatten(2).transpose(1, 2)

        return avgpool
    if method == "visionzip":
        from visionzip_kernels.integrations.core import Selection

        reducer = VisionZip(m)
        return lambda f: reducer.reduce(Selection(f["hidden"], f["scores"], f["keys"], has_cls=True)).features
    raise ValueError(f"method must be one of all, avgpool, visionzip, vistog, frozen; got {method!r}")


def group_purity(labels: torch.Tensor) -> float:
    """Mean over images of sum over groups of (patches of its majority quadrant) / 64; labels (B, 64)."""
    b, n = labels.shape
    counts = torch.zeros(b, int(labels.max()) + 1, 4, dtype=torch.int64)
    counts.index_put_((torch.arange(b)[:, None].expand(b, n), labels, QUADRANT_OF_PATCH.expand(b, n)),
                      torch.ones(b, n, dtype=torch.int64), accumulate=True)
    return float((counts.amax(dim=2).sum(dim=1).double() / n).mean())


# --------------------------------------------------------------------------------------------
# Training one method
# --------------------------------------------------------------------------------------------


def train_method(
    method: str, m: int, tower: nn.Module, data: dict, cache: dict, cfg: Config
) -> dict:
    """Train the answer head (and VisToG's parts) for one method; test accuracy, wall time, and for
    VisToG the group purity and the trained module."""
    torch.manual_seed(cfg.seed + 17 * m)
    n_tokens = GRID * GRID if method == "all" else m
    head = AnswerHead(cfg.hidden, n_tokens, cfg.heads)
    module = None
    if method in ("vistog", "frozen"):
        module = VisToG(cfg.hidden, m)
        if method == "frozen":
            for p in module.assignment_parameters():
                p.requires_grad_(False)

        def reduce_train(idx: torch.Tensor) -> torch.Tensor:
            return module(tower, data["train_pixels"][idx], feature_layer=cfg.feature_layer).tokens
    else:
        fixed = fixed_reducer(method, m)

        def reduce_train(idx: torch.Tensor) -> torch.Tensor:
            return fixed({k: v[idx] for k, v in cache["train"].items()})
    params = list(head.parameters()) + ([p for p in module.parameters() if p.requires_grad] if module else [])
    start = time.perf_counter()
    head.train()
    if module is not None:
        module.train()
    answers = data["train_answers"]
    fit(params, len(answers), cfg.epochs, cfg.seed * 1000 + 100,
        lambda idx: answer_loss(head(reduce_train(idx)), answers[idx]), f"{method} M={n_tokens}", cfg)
    train_s = time.perf_counter() - start
    head.eval()
    correct, labels = 0, []
    with torch.no_grad():
        if module is not None:
            module.eval()
        for idx in _batches(len(data["test_answers"]), 256, None):
            if module is not None:
                res = module(tower, data["test_pixels"][idx], feature_layer=cfg.feature_layer)
                tokens = res.tokens
                labels.append(res.labels)
            else:
                tokens = fixed_reducer(method, m)({k: v[idx] for k, v in cache["test"].items()})
            correct += int((head(tokens).argmax(-1) == data["test_answers"][idx]).sum())
    row = dict(method=method, tokens=n_tokens, accuracy=correct / data["test_answers"].numel(),
               train_s=round(train_s, 1), epochs=cfg.epochs)
    if module is not None:
        row["purity"] = group_purity(torch.cat(labels))
        row["_module"] = module
        row["_labels"] = torch.cat(labels)
    return row


# --------------------------------------------------------------------------------------------
# The whole demo
# --------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name as lscpu reports it (platform.processor() otherwise)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def run(cfg: Config) -> dict:
    """Pre-train, freeze, train every method of cfg.methods for every M of cfg.tokens; the results
    (rows without the private ``_module`` / ``_labels`` entries are what the JSON stores). Runs on one
    torch thread and restores the caller's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Config) -> dict:
    start = time.perf_counter()
    (tr_img, tr_lab), (te_img, te_lab) = digit_split(cfg.seed)
    train_pixels, train_answers = make_mosaics(tr_img, tr_lab, cfg.train_images, cfg.blank_prob, cfg.seed + 1)
    test_pixels, test_answers = make_mosaics(te_img, te_lab, cfg.test_images, cfg.blank_prob, cfg.seed + 2)
    data = dict(train_pixels=train_pixels, train_answers=train_answers, test_pixels=test_pixels,
                test_answers=test_answers)
    feature_layer_depth("feature_layer", cfg.feature_layer, cfg.layers)  # a clear error before minutes of pre-training
    tower = build_tower(cfg)
    t0 = time.perf_counter()
    pre_head = pretrain_tower(tower, train_pixels, train_answers, cfg)
    pretrain_s = time.perf_counter() - t0
    with torch.no_grad():
        hits = [(pre_head(tower(test_pixels[i])).argmax(-1) == pre_head.targets(test_answers[i])).float()
                for i in _batches(len(test_pixels), 256, None)]
        pre_acc = float(torch.cat(hits).mean())
    print(f"  tower pre-trained ({cfg.pretrain}): test accuracy {pre_acc:.4f} ({pretrain_s:.0f} s)", flush=True)
    cache = {"train": tower_features(tower, train_pixels, cfg), "test": tower_features(tower, test_pixels, cfg)}
    rows = []
    for method in cfg.methods:
        for m in ((GRID * GRID,) if method == "all" else cfg.tokens):
            rows.append(train_method(method, m, tower, data, cache, cfg))
            r = rows[-1]
            print(f"  {r['method']:>9} M={r['tokens']:<3} accuracy {r['accuracy']:.4f}"
                  + (f"  purity {r['purity']:.3f}" if "purity" in r else "") + f"  ({r['train_s']} s)", flush=True)
    return dict(config=asdict(cfg), rows=rows, pretrain_s=round(pretrain_s, 1), pretrain_accuracy=pre_acc,
                tower=tower, data=data, wall_s=round(time.perf_counter() - start, 1))


def public(result: dict) -> dict:
    """The JSON-able part of :func:`run`'s result, with the machine it ran on."""
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in result["rows"]]
    acc = {(r["method"], r["tokens"]): r["accuracy"] for r in rows}
    all_acc = next((r["accuracy"] for r in rows if r["method"] == "all"), None)
    summary = {}
    for m in result["config"]["tokens"]:
        if all_acc and ("vistog", m) in acc:
            summary[f"vistog_M{m}_share_of_all"] = round(acc[("vistog", m)] / all_acc, 4)
        if ("vistog", m) in acc and ("frozen", m) in acc:
            summary[f"vistog_M{m}_minus_frozen_points"] = round(100 * (acc[("vistog", m)] - acc[("frozen", m)]), 2)
    return dict(
        what="VisToG on load_digits 2x2 mosaics (examples/vistog_digits.py)",
        config=result["config"], rows=rows, summary=summary, pretrain_s=result["pretrain_s"],
        pretrain_accuracy=round(result["pretrain_accuracy"], 4),
        wall_s=result["wall_s"], cpu=cpu_name(), cpu_cores=os.cpu_count(), load_average_at_end=os.getloadavg(),
        torch=torch.__version__, torch_threads=1,
        purity="per test image, sum over groups of its patches in the group's majority quadrant / 64; mean",
    )


def plot_groups(result: dict, path: Path, n_images: int = 4) -> None:
    """The learned groups over test mosaics: each image, then its patch-to-group map per VisToG M."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["rows"] if r["method"] == "vistog"]
    pixels, answers = result["data"]["test_pixels"], result["data"]["test_answers"]
    fig, axes = plt.subplots(n_images, 1 + len(runs), figsize=(2.2 * (1 + len(runs)), 2.2 * n_images))
    for i in range(n_images):
        axes[i, 0].imshow(pixels[i, 0], cmap="gray_r")
        names = ["blank" if a == BLANK else str(int(a)) for a in answers[i]]
        axes[i, 0].set_title(" ".join(names), fontsize=9)
        for j, r in enumerate(runs, start=1):
            axes[i, j].imshow(pixels[i, 0], cmap="gray_r")
            groups = r["_labels"][i].view(GRID, GRID).float()
            axes[i, j].imshow(groups, cmap="tab10", alpha=0.55, vmin=0, vmax=9, extent=(-0.5, 15.5, 15.5, -0.5),
                              interpolation="nearest")
            if i == 0:
                axes[i, j].set_title(f"VisToG M={r['tokens']} groups\npurity {r['purity']:.2f}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(saved: dict) -> str:
    """Markdown table of a results JSON."""
    lines = ["| method | tokens | accuracy | group purity | train s |", "|---|---|---|---|---|"]
    for r in saved["rows"]:
        purity = f"{r['purity']:.3f}" if "purity" in r else ""
        lines.append(f"| {r['method']} | {r['tokens']} | {100 * r['accuracy']:.1f}% | {purity} | {r['train_s']} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Config()
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs)
    p.add_argument("--train-images", type=int, default=d.train_images)
    p.add_argument("--test-images", type=int, default=d.test_images)
    p.add_argument("--tokens", type=int, nargs="+", default=list(d.tokens))
    p.add_argument("--methods", nargs="+", default=list(d.methods), choices=list(d.methods))
    p.add_argument("--feature-layer", type=int, default=d.feature_layer)
    p.add_argument("--pretrain", choices=["patches", "cls"], default=d.pretrain,
                   help="tower objective: every patch names its quadrant (default), or the CLS names all four")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vistog_digits.json")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = Config(seed=a.seed, epochs=a.epochs, pretrain_epochs=a.pretrain_epochs, train_images=a.train_images,
                 test_images=a.test_images, tokens=tuple(a.tokens), methods=tuple(a.methods),
                 feature_layer=a.feature_layer, pretrain=a.pretrain, progress=not a.no_progress)
    result = run(cfg)
    saved = public(result)
    print(table(saved))
    print(json.dumps(saved["summary"]), f"wall {saved['wall_s']} s on {saved['cpu']}")
    if not a.no_save:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(saved, indent=1) + "\n")
        if any(r["method"] == "vistog" for r in result["rows"]):
            plot_groups(result, a.out.with_name(a.out.stem + "_groups.png"))
    return result


if __name__ == "__main__":
    main()
