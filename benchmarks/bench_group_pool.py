"""Benchmark visionzip::group_pool against the dense one-hot formulation (docs/spec.md "Group pool").

    python benchmarks/bench_group_pool.py                      # B=8, N=576, M=64, C=1024, float32
    python benchmarks/bench_group_pool.py --batch 1 --dtype bfloat16

Methods, all measured side by side in one run on the same inputs, in interleaved rounds: ``dense-eager``
(``visionzip_kernels.baseline.group_pool_dense_eager``: one-hot A from argmax, then (A @ V) /
(count + eps)), ``compile(dense)`` (torch.compile of it), and the package's kernels available on the
device (``cpu``; on CUDA ``cuda`` and ``triton``). Columns: median ms per call, speedup over
dense-eager and over compile(dense), and the time of one ``clone()`` of the values (the bytes the
kernels must read). Prints a markdown table and writes JSON to benchmarks/results/ named after the
machine (the CPU's model name, as lscpu reports it) and, on CPU, the torch thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import visionzip_kernels as vz  # noqa: E402
from bench_compress import call_ms, machine_name, sync  # noqa: E402
from visionzip_kernels.baseline import group_pool_dense_eager  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FUSED = ("cpu", "triton", "cuda")


def methods_for(device: torch.device, eps: float, skip: set[str]) -> dict[str, Callable[..., torch.Tensor]]:
    compiled = torch.compile(group_pool_dense_eager, dynamic=False)
    m: dict[str, Callable[..., torch.Tensor]] = {
        "dense-eager": lambda lg, v: group_pool_dense_eager(lg, v, eps=eps),
        "compile(dense)": lambda lg, v: compiled(lg, v, eps=eps),
    }
    for backend in vz.available_group_pool_backends(device):
        if backend in FUSED and not (device.type == "cpu" and backend == "triton"):  # no interpreter timings
            m[backend] = lambda lg, v, _b=backend: vz.group_pool(lg, v, eps=eps, backend=_b)
    return {k: v for k, v in m.items() if k not in skip}


def interleaved_ms(fns: dict[str, Callable[[], object]], device: torch.device, min_time: float,
                   max_rounds: int = 500) -> dict[str, float]:
    """Median ms per call of each function, timed in rounds that call every function once (so that
    a shared machine's load changes hit all of them alike), after warm-up; CUDA: events per call."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    while len(times[next(iter(fns))]) < 5 or (time.perf_counter() - start < min_time and
                                              len(times[next(iter(fns))]) < max_rounds):
        for name, fn in fns.items():
            times[name].append(call_ms(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.batch, args.groups, args.patches, generator=g).to(device, dtype)
    values = torch.randn(args.batch, args.patches, args.channels, generator=g).to(device, dtype)
    methods = methods_for(device, args.eps, set(args.skip))
    want = vz.group_pool_reference(logits, values, eps=args.eps).output.float()
    # every method computes the same thing
    errors = {name: (fn(logits, values).float() - want).abs().max().item() for name, fn in methods.items()}
    load_before = os.getloadavg()[0]
    ms = interleaved_ms({"clone": values.clone} | {k: (lambda f=f: f(logits, values)) for k, f in methods.items()},
                        device, args.min_time)
    clone_ms = ms.pop("clone")
    rows = [dict(method=k, ms=v, max_abs_diff_vs_reference=errors[k]) for k, v in ms.items()]
    for r in rows:
        r["speedup_vs_dense_eager"] = ms["dense-eager"] / r["ms"] if "dense-eager" in ms else None
        r["speedup_vs_compile"] = ms["compile(dense)"] / r["ms"] if "compile(dense)" in ms else None
        r["vs_clone"] = r["ms"] / clone_ms
    return dict(
        machine=machine_name(device),
        device=str(device),
        torch=torch.__version__,
        dtype=args.dtype,
        shape=dict(batch=args.batch, patches=args.patches, groups=args.groups, channels=args.channels),
        eps=args.eps,
        clone_ms=clone_ms,
        load_average=[load_before, os.getloadavg()[0]],  # 1-min load before / after: a shared machine's noise
        rows=rows,
    )


def markdown(result: dict) -> str:
    s = result["shape"]
    lines = [
        f"{result['machine']}, torch {result['torch']}, {result['dtype']}, B={s['batch']} N={s['patches']} "
        f"M={s['groups']} C={s['channels']} (medians, one run; clone of values {result['clone_ms']:.3f} ms; "
        f"load average {result['load_average'][0]:.1f} -> {result['load_average'][1]:.1f})",
        "",
        "| method | ms | vs dense-eager | vs compile(dense) | / clone time |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        f = lambda x: "-" if x is None else f"{x:.1f}x"  # noqa: E731
        lines.append(f"| {r['method']} | {r['ms']:.3f} | {f(r['speedup_vs_dense_eager'])} | "
                     f"{f(r['speedup_vs_compile'])} | {r['vs_clone']:.2f} |")
    return "\n".join(lines)


def default_out(result: dict) -> Path:
    model = re.sub(r"\s*\(.*", "", result["machine"])  # the model name, without the core counts
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    threads = f"-{torch.get_num_threads()}t" if torch.device(result["device"]).type == "cpu" else ""
    return RESULTS / f"group_pool-{torch.device(result['device']).type}-{slug}{threads}-{result['dtype']}.json"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--patches", type=int, default=576)
    p.add_argument("--groups", type=int, default=64)
    p.add_argument("--channels", type=int, default=1024)
    p.add_argument("--eps", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); on a shared machine 1 is the least disturbed")
    p.add_argument("--min-time", type=float, default=10.0, help="seconds of timed rounds (at least 5 rounds)")
    p.add_argument("--skip", nargs="*", default=[], help="methods to leave out, e.g. compile(dense)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/group_pool-<device>-<machine>-<dtype>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    out = Path(args.out) if args.out else default_out(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
