"""The CPU kernels' instruction-set paths and thread splits.

The C++ kernels (compress, scores, group_pool) are compiled three times (baseline x86-64, AVX2 + FMA, AVX-512; csrc/cpu/isa.h) and
the widest one the CPU supports runs unless VISIONZIP_CPU_ISA forces another. It is read once per
process, so every path runs in a subprocess (this file run as a script), which checks that its
results are bit-identical for 1, 2 and 3 threads and saves them; the tests then compare each path
with the float64 oracle (choices exact on lattice inputs) and the paths with one another, and
compress's two read orders of hidden (csrc/cpu/cache.h) bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # the subprocess: make the package and tests.helpers importable
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))
import visionzip_kernels as vz  # noqa: E402
from cpu_peak import cpu_isa_paths as supported_isas  # noqa: E402  (the paths this CPU runs)
from tests.helpers import Case, check_against_reference, make_case  # noqa: E402


def compress_cases() -> dict[str, tuple[Case, bool]]:
    """name -> (case, choices must equal the oracle's exactly). Fixed seeds: every path sees the same inputs."""
    return {
        # CLS, B = 3 (one whole round of 2 threads + one image over all threads at 2 threads), keys
        "cls-b3": (make_case(3, 577, 256, heads=16, form="full", k=64, key_dim=64, seed=1), False),
        # no CLS, full (B, H, N, N): received attention summed in row blocks
        "nocls-full": (make_case(2, 729, 72, heads=4, form="full", k=64, key_dim=16, has_cls=False, seed=2), False),
        # bfloat16, B = 5, no keys (hidden is the metric)
        "bf16-b5-nokeys": (make_case(5, 577, 96, heads=16, form="full", k=64, key_dim=None, dtype=torch.bfloat16,
                                     seed=3), False),
        # float16, contextual = 0: the remaining tokens are dropped
        "fp16-cx0": (make_case(1, 300, 40, heads=3, form="full", k=50, contextual=0, has_cls=False,
                               dtype=torch.float16, seed=4), False),
        "fp64-rows": (make_case(2, 200, 33, heads=2, form="rows", k=30, dtype=torch.float64, seed=5), False),
        # keys of 37 channels: not a multiple of any vector width (the assignment's transpose leaves a
        # tail of channels), cx = 14 > 12 (two target chunks)
        "odd-keydim": (make_case(2, 301, 64, heads=3, form="full", k=90, contextual=14, key_dim=37, seed=10),
                       False),
        "lattice": (make_case(3, 201, 64, heads=5, form="full", k=40, key_dim=16, has_cls=False, lattice=True,
                              seed=6), True),
        "lattice-cls-bf16": (make_case(1, 201, 64, heads=5, form="full", k=40, key_dim=16, lattice=True,
                                       dtype=torch.bfloat16, seed=7), True),
    }


def score_inputs() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(8)
    q, k = torch.randn(2, 3, 300, 64, generator=g) * 1.5, torch.randn(2, 3, 300, 64, generator=g)
    q72, k72 = torch.randn(1, 4, 729, 72, generator=g) * 1.5, torch.randn(1, 4, 729, 72, generator=g)
    return {"f32": (q, k), "bf16": (q.bfloat16(), k.bfloat16()), "d72": (q72, k72)}


def group_pool_inputs() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (logits (B, M, N), values (B, N, C)); C not a multiple of any vector width, B > threads."""
    g = torch.Generator().manual_seed(9)
    logits, values = torch.randn(3, 16, 577, generator=g), torch.randn(3, 577, 200, generator=g)
    ties = torch.randint(-2, 3, (2, 8, 301), generator=g).float()  # ties everywhere: the lower m wins
    return {
        "f32-b3": (logits, values),
        "bf16": (logits.bfloat16(), values.bfloat16()),
        "ties-c1030": (ties, torch.randn(2, 301, 1030, generator=g)),
    }


def run_all() -> dict:
    """Every case at 1, 2 and 3 threads; asserts the three agree bit for bit, returns the 2-thread results."""
    before = torch.get_num_threads()
    out: dict = {"compress": {}, "received": {}, "cls": {}, "group_pool": {}, "segments": None}
    try:
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            r: dict = {"compress": {}, "received": {}, "cls": {}, "group_pool": {}}
            for name, (case, _) in compress_cases().items():
                res = vz.compress(case.hidden, case.attn, case.k, **case.kwargs(), backend="cpu", return_indices=True)
                r["compress"][name] = tuple(res)
            for name, (q, k) in score_inputs().items():
                r["received"][name] = vz.received_scores(q, k, backend="cpu")
                r["cls"][name] = vz.cls_scores(q[:, :, 0], k, backend="cpu")
            for name, (logits, values) in group_pool_inputs().items():
                r["group_pool"][name] = tuple(vz.group_pool(logits, values, backend="cpu", return_labels=True))
            q, k = score_inputs()["f32"]
            r["segments"] = vz.received_scores(q[:1], k[:1], cu_seqlens=torch.tensor([0, 64, 65, 200, 300]),
                                               backend="cpu")
            runs.append(r)
    finally:
        torch.set_num_threads(before)
    first = runs[0]
    for threads, other in zip((2, 3), runs[1:]):
        for kind in ("compress", "received", "cls", "group_pool"):
            for name, val in first[kind].items():
                vals = val if isinstance(val, tuple) else (val,)
                others = other[kind][name] if isinstance(val, tuple) else (other[kind][name],)
                for a, b in zip(vals, others):
                    assert torch.equal(a, b), f"{kind} {name}: 1 thread and {threads} threads differ"
        assert torch.equal(first["segments"], other["segments"]), f"segments: 1 and {threads} threads differ"
    return runs[1]


def subprocess_env(**env_vars: str) -> dict[str, str]:
    """This process's environment plus env_vars (the kernels read them once per process), the package importable."""
    return dict(os.environ, **env_vars, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def results_in_subprocess(path: Path, **env_vars: str) -> dict:
    """run_all() in a subprocess with the given environment variables."""
    env = subprocess_env(**env_vars)
    res = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{env_vars}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return torch.load(path)


@pytest.fixture(scope="module")
def isa_results(tmp_path_factory) -> dict[str, dict]:
    """Each supported path's results, computed in a subprocess with VISIONZIP_CPU_ISA set."""
    return {isa: results_in_subprocess(tmp_path_factory.mktemp("isa") / f"{isa}.pt", VISIONZIP_CPU_ISA=isa)
            for isa in supported_isas()}


@pytest.mark.parametrize("isa", supported_isas())
def test_each_path_matches_oracle_and_is_thread_count_independent(isa, isa_results):
    res = isa_results[isa]  # the subprocess already checked 1 / 2 / 3 threads bit for bit
    for name, (case, exact) in compress_cases().items():
        check_against_reference(case, vz.CompressResult(*res["compress"][name]), exact=exact)
    for name, (q, k) in score_inputs().items():
        ref_r = vz.received_scores_reference(q.double(), k.double())
        ref_c = vz.cls_scores_reference(q[:, :, 0].double(), k.double())
        torch.testing.assert_close(res["received"][name].double(), ref_r, rtol=2e-5, atol=1e-12)
        torch.testing.assert_close(res["cls"][name].double(), ref_c, rtol=2e-5, atol=1e-12)
    q, k = score_inputs()["f32"]
    cu = torch.tensor([0, 64, 65, 200, 300])
    ref = vz.received_scores_reference(q[:1].double(), k[:1].double(), cu_seqlens=cu)
    torch.testing.assert_close(res["segments"].double(), ref, rtol=2e-5, atol=1e-12)
    for name, (logits, values) in group_pool_inputs().items():
        out, labels, counts = res["group_pool"][name]
        ref = vz.group_pool_reference(logits.double(), values.double())
        assert torch.equal(labels, ref.labels) and torch.equal(counts, ref.counts), f"group_pool {name}: labels"
        tol = 1.6e-2 if values.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(out.double(), ref.output, rtol=tol, atol=tol)


def test_paths_agree(isa_results):
    """Different paths may round differently, but exact inputs give identical choices and outputs."""
    isas = list(isa_results)
    if len(isas) < 2:
        pytest.skip("one instruction-set path on this CPU")
    base = isa_results[isas[0]]
    for isa in isas[1:]:
        other = isa_results[isa]
        for name, (case, exact) in compress_cases().items():
            a, b = base["compress"][name], other["compress"][name]
            if exact:
                for x, y in zip(a, b):
                    assert torch.equal(x, y), f"{name}: {isas[0]} and {isa} differ on lattice inputs"
            tol = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}.get(a[0].dtype, 1e-5)
            if torch.equal(a[1], b[1]) and torch.equal(a[3], b[3]):  # same choices: outputs agree to rounding
                torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
        for kind in ("received", "cls"):
            for name in base[kind]:
                torch.testing.assert_close(base[kind][name], other[kind][name], rtol=2e-5, atol=1e-12)
        for name, (a, b) in ((n, (base["group_pool"][n], other["group_pool"][n])) for n in base["group_pool"]):
            assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]), f"group_pool {name}: labels differ"
            tol = 1.6e-2 if a[0].dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)


def test_default_path_is_the_widest(isa_results):
    widest = supported_isas()[-1]
    for name, (case, _) in compress_cases().items():
        res = vz.compress(case.hidden, case.attn, case.k, **case.kwargs(), backend="cpu", return_indices=True)
        for a, b in zip(res, isa_results[widest]["compress"][name]):
            assert torch.equal(a, b), f"{name}: the default path is not {widest}"


def test_read_order_changes_no_bits(isa_results, tmp_path):
    """compress's pass reads the members target by target (group_pool its patches group by group)
    when the data fit in the last-level cache (every case here does) and in token order otherwise
    (VISIONZIP_CPU_CACHE_BYTES=0 forces it): each sum adds its rows in token order either way, so the
    results are the same bits."""
    widest = supported_isas()[-1]
    token_order = results_in_subprocess(tmp_path / "token-order.pt", VISIONZIP_CPU_ISA=widest,
                                        VISIONZIP_CPU_CACHE_BYTES="0")
    for name in compress_cases():
        for a, b in zip(isa_results[widest]["compress"][name], token_order["compress"][name]):
            assert torch.equal(a, b), f"{name}: the two read orders differ"
    for name in group_pool_inputs():  # group_pool's patches: group by group, or in patch order
        for a, b in zip(isa_results[widest]["group_pool"][name], token_order["group_pool"][name]):
            assert torch.equal(a, b), f"group_pool {name}: the two read orders differ"


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [("VISIONZIP_CPU_ISA", v, "VISIONZIP_CPU_ISA must be baseline, avx2 or avx512") for v in ("sse9", "AVX2 ")]
    + [("VISIONZIP_CPU_CACHE_BYTES", v, "VISIONZIP_CPU_CACHE_BYTES must be a byte count") for v in ("-1", "32M", "lots")],
)
def test_bad_env_value_is_a_clear_error(var, value, message):
    code = ("import torch, visionzip_kernels as vz\n"
            "vz.compress(torch.randn(1, 10, 8), torch.rand(1, 10), 4, backend='cpu')")
    res = subprocess.run([sys.executable, "-c", code], env=subprocess_env(**{var: value}), capture_output=True,
                         text=True)
    assert res.returncode != 0 and message in res.stderr


@pytest.mark.parametrize("batch", [3, 5])
@pytest.mark.parametrize("has_cls", [True, False], ids=["cls", "nocls"])
def test_leftover_images_equal_per_image_calls(batch, has_cls):
    """B = 3, 5 at 2 threads: whole rounds go one image per thread, the image left over uses both
    threads (channel slices, parallel row blocks of the received attention, parallel assignment);
    every image must equal the same image compressed alone (B = 1: all threads inside the image)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        case = make_case(batch, 577, 200, heads=6, form="full", k=64, key_dim=32, has_cls=has_cls, seed=batch)
        whole = vz.compress(case.hidden, case.attn, case.k, keys=case.keys, has_cls=has_cls, backend="cpu",
                            return_indices=True)
        for i in range(batch):
            one = vz.compress(case.hidden[i : i + 1], case.attn[i : i + 1], case.k, keys=case.keys[i : i + 1],
                              has_cls=has_cls, backend="cpu", return_indices=True)
            for a, b in zip(whole, one):
                assert torch.equal(a[i : i + 1], b), f"image {i} of {batch}"
    finally:
        torch.set_num_threads(before)


def test_many_targets_and_wide_metric():
    """More targets than one vector of lanes (several target blocks in the assignment micro-kernel)
    and a metric wider than a cache line, against the oracle."""
    case = make_case(2, 400, 48, heads=2, form="rows", k=200, contextual=70, key_dim=None, seed=9)
    res = vz.compress(case.hidden, case.attn, case.k, contextual=70, backend="cpu", return_indices=True)
    check_against_reference(case, res)


if __name__ == "__main__":
    torch.save(run_all(), sys.argv[1])
