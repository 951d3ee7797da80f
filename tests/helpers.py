"""Input generators and the oracle check shared by every backend's tests.

``check_against_reference`` compares a backend's :class:`CompressResult` with the float64 oracle.
Where the backend's choices equal the oracle's, the outputs must match. Where they differ, the
difference must be a near tie (fp32 summation order differs between backends): the dominant set
must still be a top-D set and every assignment an argmax within ``score_tol`` / ``sim_tol``, and
the output must then match the oracle's arithmetic applied to the backend's own choices.
``exact=True`` (lattice inputs, whose scores and similarities are exact in any summation order)
demands identical choices, which pins the tie rules.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

import visionzip_kernels as vz
from visionzip_kernels import CompressResult, GroupPoolResult, compress_reference
from visionzip_kernels._backends import BACKENDS, available
from visionzip_kernels.reference import normalize_rows, target_positions, token_scores

@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Inside, torch.empty fills floats with NaN and integers with their max value (CPU and CUDA):
    an output element a kernel does not write cannot pass a comparison."""
    det = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn)
        torch.utils.deterministic.fill_uninitialized_memory = fill


@dataclass(frozen=True)
class BackendUnderTest:
    """One (backend, device) pair of the contract suites: what the ``compress_backend`` and
    ``group_pool_backend`` fixtures of tests/conftest.py yield, for every backend the registry
    declares on every device type."""

    name: str
    device: str

    @property
    def interpreted(self) -> bool:
        """Triton on CPU tensors: the interpreter, where each program instance costs ~1 ms."""
        return self.name == "triton" and self.device == "cpu"

    def takes(self, dtype: torch.dtype, op: str = "compress") -> bool:
        return dtype in BACKENDS[self.name].ops[op]

    def run(self, case: "Case", **kwargs) -> CompressResult:
        return vz.compress(case.hidden, case.attn, case.k, **case.kwargs(), backend=self.name, return_indices=True,
                           **kwargs)

    def group_pool(self, logits: torch.Tensor, values: torch.Tensor, **kwargs) -> GroupPoolResult:
        return vz.group_pool(logits, values, backend=self.name, return_labels=True, **kwargs)

    def __str__(self) -> str:
        return f"{self.name}-{self.device}"


def backend_params(op: str = "compress") -> list:
    """pytest params of every backend declaring ``op`` on every device type it runs on; CUDA ones are
    GPU tests (the fixtures of tests/conftest.py skip those not available here)."""
    import pytest

    params = []
    for device in ("cpu", "cuda"):
        for name, backend in BACKENDS.items():
            if op in backend.ops and (backend.devices is None or device in backend.devices):
                bk = BackendUnderTest(name, device)
                params.append(pytest.param(bk, id=str(bk), marks=[pytest.mark.gpu] if device == "cuda" else []))
    return params


def require(bk: BackendUnderTest, op: str = "compress") -> BackendUnderTest:
    """``bk``, or skip the test where it is not available for ``op`` (Triton on CPU needs its
    interpreter)."""
    import pytest

    if bk.name not in available(op, bk.device):
        pytest.skip(f"backend {bk.name!r} is not available on {bk.device} in this environment")
    return bk


OUT_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


@dataclass
class Case:
    hidden: torch.Tensor
    attn: torch.Tensor
    k: int
    keys: Optional[torch.Tensor] = None
    contextual: Optional[int] = None
    has_cls: bool = True
    seed: int = 0

    def kwargs(self) -> dict:
        return dict(keys=self.keys, contextual=self.contextual, has_cls=self.has_cls)

    def __repr__(self) -> str:
        kd = None if self.keys is None else tuple(self.keys.shape)
        return (
            f"Case(hidden={tuple(self.hidden.shape)} {self.hidden.dtype}, attn={tuple(self.attn.shape)}, k={self.k}, "
            f"keys={kd}, contextual={self.contextual}, has_cls={self.has_cls}, seed={self.seed})"
        )


def make_case(
    b: int,
    n: int,
    c: int,
    *,
    heads: int = 4,
    form: str = "full",
    k: int = 64,
    key_dim: Optional[int] = 16,
    contextual: Optional[int] = None,
    has_cls: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    lattice: bool = False,
    seed: Optional[int] = None,
) -> Case:
    """Fresh random inputs (a new seed each call unless given; the seed is in the Case's repr).

    form: "full" (B, H, N, N) softmax probabilities, "rows" (B, H, N), "scores" (B, N).
    lattice: attention values are multiples of 1/256 and metric rows are +-1 vectors, so every
    score and similarity is exact in fp32/fp16/bf16 whatever the summation order, and ties occur.
    """
    if lattice and not key_dim:
        # hidden is then the metric: +-1 rows are exact after normalisation only when sqrt(C) is a power of 2
        assert c & (c - 1) == 0 and (c.bit_length() - 1) % 2 == 0, "lattice without keys needs C a power of 4"
    if lattice and key_dim:
        assert key_dim & (key_dim - 1) == 0 and (key_dim.bit_length() - 1) % 2 == 0, "lattice key_dim: power of 4"
    seed = random.randrange(2**31) if seed is None else seed
    g = torch.Generator().manual_seed(seed)
    shape = {"full": (b, heads, n, n), "rows": (b, heads, n), "scores": (b, n)}[form]
    if lattice:
        attn = torch.randint(0, 256, shape, generator=g).float() / 256
        sign = lambda *s: torch.randint(0, 2, s, generator=g).float() * 2 - 1  # noqa: E731
        keys = sign(b, n, key_dim) if key_dim else None
        hidden = torch.randn(b, n, c, generator=g) if key_dim else sign(b, n, c)
    else:
        logits = torch.randn(shape, generator=g) * 3
        attn = logits.softmax(-1) if form != "scores" else logits
        keys = torch.randn(b, n, key_dim, generator=g) if key_dim else None
        hidden = torch.randn(b, n, c, generator=g)
    to = dict(dtype=dtype, device=device)
    return Case(
        hidden=hidden.to(**to),
        attn=attn.to(**to),
        k=k,
        keys=None if keys is None else keys.to(**to),
        contextual=contextual,
        has_cls=has_cls,
        seed=seed,
    )


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def expected_from_choices(case: Case, res: CompressResult) -> torch.Tensor:
    """The oracle's float64 arithmetic applied to the backend's own choices, in hidden's dtype."""
    h = case.hidden.double().cpu()
    dom, tgt, tmap = (t.cpu() for t in (res.dominant_indices, res.contextual_indices, res.token_map))
    b, n, c = h.shape
    d, cx = dom.shape[1], tgt.shape[1]
    blocks = [_gather(h, dom)]
    if cx:
        member = (tmap >= d) & (tmap.scatter(1, tgt, -2) != -2)  # merged tokens that are not targets
        label = (tmap - d).clamp_min(0)
        sums = torch.zeros(b, cx, c, dtype=torch.float64).scatter_add_(
            1, label.unsqueeze(-1).expand(-1, -1, c), h * member.unsqueeze(-1)
        )
        counts = torch.zeros(b, cx, dtype=torch.float64).scatter_add_(1, label, member.double())
        blocks.append(_gather(h, tgt) + sums / counts.clamp_min(1).unsqueeze(-1))
    return torch.cat(blocks, 1).to(case.hidden.dtype)


def check_structure(case: Case, res: CompressResult) -> None:
    """Shapes, dtypes and internal consistency of the indices (valid for any correct backend)."""
    b, n, c = case.hidden.shape
    d = res.dominant_indices.shape[1]
    cx = res.contextual_indices.shape[1]
    assert d + cx == case.k
    assert res.output.shape == (b, case.k, c) and res.output.dtype == case.hidden.dtype, case
    assert res.output.device == case.hidden.device
    for t, shape in ((res.dominant_indices, (b, d)), (res.contextual_indices, (b, cx)), (res.token_map, (b, n))):
        assert t.dtype == torch.long and t.shape == shape, (t.dtype, t.shape, shape, case)
    dom, tgt, tmap = (t.cpu() for t in (res.dominant_indices, res.contextual_indices, res.token_map))
    if d > 1:
        assert (dom[:, 1:] > dom[:, :-1]).all(), f"dominant indices not strictly ascending: {case}"
    assert ((dom >= 0) & (dom < n)).all()
    if case.has_cls:
        assert (dom[:, 0] == 0).all(), f"CLS not kept: {case}"
    # token_map: dominant rows 0..D-1 in order; the others D + label (or -1 when Cx = 0)
    assert (tmap.gather(1, dom) == torch.arange(d)).all(), case
    kept = torch.zeros(b, n, dtype=torch.bool).scatter(1, dom, True)
    rest = torch.sort(kept.to(torch.uint8), dim=1, stable=True).indices[:, : n - d]
    if cx == 0:
        assert (tmap.gather(1, rest) == -1).all(), case
        return
    pos = target_positions(n - d, cx)
    assert torch.equal(tgt, rest[:, pos]), f"targets are not at positions 0, step, ...: {case}"
    assert torch.equal(tmap.gather(1, tgt), d + torch.arange(cx).expand(b, -1)), case
    lab = tmap.gather(1, rest)
    assert ((lab >= d) & (lab < d + cx)).all(), case


def check_against_reference(
    case: Case,
    res: CompressResult,
    *,
    exact: bool = False,
    score_tol: float = 1e-5,
    sim_tol: float = 1e-5,
) -> None:
    """Assert ``res`` is what the oracle computes for ``case`` (see module docstring)."""
    check_structure(case, res)
    c64 = {k: (v.double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in case.kwargs().items()}
    ref = compress_reference(case.hidden.double().cpu(), case.attn.double().cpu(), case.k, **c64)
    same = all(
        torch.equal(a.cpu(), b)
        for a, b in zip(res[1:], (ref.dominant_indices, ref.contextual_indices, ref.token_map))
    )
    if exact:
        assert same, f"choices differ from the oracle on exact (lattice) inputs: {case}"
    if not same:
        _check_near_ties(case, res, score_tol, sim_tol)
    expected = expected_from_choices(case, res)
    torch.testing.assert_close(res.output.cpu(), expected, **OUT_TOL[case.hidden.dtype], msg=lambda m: f"{m}\n{case}")


def _check_near_ties(case: Case, res: CompressResult, score_tol: float, sim_tol: float) -> None:
    """The backend's choices differ from the oracle's: prove they are optimal up to rounding."""
    b, n, _ = case.hidden.shape
    scores = token_scores(case.attn.double().cpu(), has_cls=case.has_cls, dtype=torch.float64)
    scores = scores.nan_to_num(nan=float("-inf"))
    dom, tgt, tmap = (t.cpu() for t in (res.dominant_indices, res.contextual_indices, res.token_map))
    kept = torch.zeros(b, n, dtype=torch.bool).scatter(1, dom, True)
    pick = kept.clone()
    if case.has_cls:
        pick[:, 0] = False
        scores[:, 0] = float("-inf")
    scale = scores.abs().masked_fill(scores.isinf(), 0).amax(1).clamp_min(1e-30)
    worst_in = scores.masked_fill(~pick, float("inf")).amin(1)
    best_out = scores.masked_fill(kept, float("-inf")).amax(1)
    ok = (worst_in >= best_out - score_tol * scale) | ~pick.any(1) | kept.all(1)
    assert ok.all(), f"dominant set is not a top-D set (by > {score_tol} relative): {case}"
    d, cx = dom.shape[1], tgt.shape[1]
    if cx == 0:
        return
    metric = (case.keys if case.keys is not None else case.hidden).double().cpu()
    nm = normalize_rows(metric, torch.float64)
    sims = torch.bmm(nm, _gather(nm, tgt).transpose(1, 2))  # (B, N, Cx)
    merged = tmap >= d
    chosen = sims.gather(2, (tmap - d).clamp_min(0).unsqueeze(-1)).squeeze(-1)
    best = sims.amax(2)
    bad = merged & (chosen < best - sim_tol)
    assert not bad.any(), f"{int(bad.sum())} tokens not assigned to their most similar target: {case}"
