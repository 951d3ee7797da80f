"""Benchmark visionzip::compress against the eager transcription of the original code and
torch.compile of the reference, on named VLM workloads.

    python benchmarks/bench_compress.py                       # default workloads, table + JSON + PNG
    python benchmarks/bench_compress.py --workloads llava15-b8 video --dtype float32
    python benchmarks/bench_compress.py --skip eager "compile(reference)" reference --cpu-isa avx2 --no-save

Every row is a median over repeated calls, all methods of a workload measured side by side in one
run. Columns: median ms per call, speedup over eager, and the memory floor: the bytes the call must
move (each needed input byte read once, the outputs, indices included, written once), the time of one
copy of the largest needed input (``clone``: reads and writes it once), and the fraction of a measured
copy bandwidth reached on those bytes. On CPU that bandwidth is a warm ``copy_`` of the workload's
largest needed input (hidden; the attention matrix without CLS) into a pre-allocated tensor, timed in
the same run (bytes read + written over its median time) in alternating blocks with the package's
kernel, so that both sample the same load of a shared machine, and the small workloads are compared
with a copy in the same cache level as their own data. On GPU it is one device-to-device copy of 256 MiB,
and the fraction is taken on the package kernels' device time per call (one CUDA graph of calls,
replayed: no launch overhead). On GPU every call takes the next of several copies of the inputs, so
that the bytes come from device memory, not from the L2 cache.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import visionzip_kernels as vz  # noqa: E402
from cpu_peak import cpu_isa_paths  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Workload:
    name: str
    batch: int
    tokens: int
    channels: int
    heads: int
    k: int
    has_cls: bool
    key_dim: int = 64
    what: str = ""


WORKLOADS = {
    w.name: w
    for w in [
        Workload("llava15", 1, 577, 1024, 16, 64, True, what="LLaVA-1.5, CLIP-L/336, one image"),
        Workload("llava15-b8", 8, 577, 1024, 16, 64, True, what="8 images of LLaVA-1.5"),
        Workload("llava-next", 5, 577, 1024, 16, 64, True, what="LLaVA-NeXT anyres: 5 crops"),
        Workload("video", 32, 577, 1024, 16, 64, True, what="32 video frames"),
        Workload("siglip384", 1, 729, 1152, 16, 64, False, 72, what="SigLIP-so400m/384, no CLS"),
        Workload("clip448", 1, 1025, 1024, 16, 64, True, what="CLIP-L/448"),
        Workload("stress-b256", 256, 577, 1024, 16, 64, True, what="256 images (GPU stress row)"),
    ]
}
DEFAULT_CPU = ["llava15", "llava15-b8", "llava-next", "video", "siglip384", "clip448"]
DEFAULT_GPU = DEFAULT_CPU + ["stress-b256"]
FUSED = ("cpu", "triton", "cuda")  # the package's kernels (the rest are baselines)


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def cpu_isa_path() -> str:
    """The CPU kernels' instruction-set path in this process: VISIONZIP_CPU_ISA, else the widest the
    CPU has (cpu_peak.cpu_isa_paths, the flags csrc/cpu/isa.h checks)."""
    return os.environ.get("VISIONZIP_CPU_ISA") or cpu_isa_paths()[-1]


def make_inputs(w: Workload, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """Random inputs shaped like the selection layer's tensors (full attention probabilities)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    attn = torch.empty(w.batch, w.heads, w.tokens, w.tokens, dtype=dtype, device=device)
    for b in range(w.batch):  # one image at a time: the float32 logits of the whole batch can be large
        logits = torch.randn(w.heads, w.tokens, w.tokens, generator=g) * 3
        attn[b] = logits.softmax(-1).to(dtype)
    hidden = torch.randn(w.batch, w.tokens, w.channels, generator=g).to(device, dtype)
    keys = torch.randn(w.batch, w.tokens, w.key_dim, generator=g).to(device, dtype)
    return dict(hidden=hidden, attn=attn, keys=keys)


def input_sets(w: Workload, dtype: torch.dtype, device: torch.device, max_bytes: float = 8e9) -> list[dict]:
    """The inputs, plus on CUDA enough copies at other addresses that cycling through them makes every
    call stream its bytes from device memory instead of the 50 MB L2 (a single buffer would measure the
    cache). Copies, not fresh draws: the timing needs other addresses, the values may repeat."""
    first = make_inputs(w, dtype, device)
    if device.type != "cuda":
        return [first]
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    allocated = sum(t.numel() * t.element_size() for t in first.values())
    n = min(256, math.ceil(4 * l2 / bytes_moved(w, first["hidden"].element_size())), int(max_bytes // allocated))
    return [first] + [{k: v.clone() for k, v in first.items()} for _ in range(max(0, n - 1))]


def bytes_moved(w: Workload, es: int) -> int:
    """Bytes a compress call must move: hidden read once, CLS rows (or the whole matrix for received
    attention) read once, keys read once, output written once, and the int64 index outputs the op
    writes (dominant (B, D), contextual (B, Cx), token map (B, N)) written once."""
    attn = w.batch * w.heads * w.tokens * (1 if w.has_cls else w.tokens)
    data = es * (w.batch * w.tokens * w.channels + attn + w.batch * w.tokens * w.key_dim + w.batch * w.k * w.channels)
    return data + 8 * w.batch * (w.k + w.tokens)  # D + Cx = k index entries, plus the token map


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """One call of ``fn`` in ms: CUDA events around it on a GPU, wall time on the CPU."""
    if device.type == "cuda":
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        return s.elapsed_time(e)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def sample_ms(fn: Callable[[], object], device: torch.device, min_time: float, max_reps: int = 10_000) -> list[float]:
    """Times of ``fn`` in ms (call_ms), after warm-up: calls for ``min_time`` seconds (at least 5, at most
    ``max_reps``), so that a fast call's times span the whole window, not a burst of a shared machine's
    load."""
    for _ in range(3):
        fn()
    sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start_all < min_time and len(times) < max_reps):
        times.append(call_ms(fn, device))
    return times


def median_ms(fn: Callable[[], object], device: torch.device, min_time: float, max_reps: int = 10_000) -> float:
    """Median of :func:`sample_ms`."""
    return statistics.median(sample_ms(fn, device, min_time, max_reps))


def rounds_ms(fns: dict[str, Callable[[], object]], min_time: float, rounds: int = 5) -> dict[str, float]:
    """CPU: median ms per call of each of ``fns``, measured in ``rounds`` alternating blocks of
    ``min_time / rounds`` seconds each (:func:`sample_ms`, warmed up at the start of every block), the
    medians taken over all blocks: a shared machine's load drifts over seconds, and the blocks let
    every function sample the same drift, while each block keeps its own data warm."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += sample_ms(fn, torch.device("cpu"), min_time / rounds)
    return {name: statistics.median(t) for name, t in times.items()}


def graph_ms(fn: Callable[[dict], object], sets: list[dict], device: torch.device, min_time: float) -> float | None:
    """Device time per call: one CUDA graph holding one call per input set, replayed (no launch or
    Python overhead in it, and the sets rotate through memory as in the per-call timing). None when
    the call cannot be captured."""
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for x in sets:
                fn(x)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for x in sets:
                fn(x)
    except Exception as exc:  # noqa: BLE001 - report and go on: the per-call time still stands
        print(f"  (no CUDA graph: {type(exc).__name__}: {exc})")
        return None
    return median_ms(graph.replay, device, min_time) / len(sets)


def copy_bandwidth_gbs(device: torch.device, src: torch.Tensor | None = None, min_time: float = 1.0) -> float:
    """Measured copy bandwidth, counting bytes read plus bytes written (GB/s): ``dst.copy_(src)`` into a
    pre-allocated ``dst`` (no page faults timed), warm (median_ms warms up first). ``src`` defaults
    to 256 MiB (the GPU figure: device memory, far beyond the L2)."""
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if src is None else src
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), device, min_time=min_time)
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def methods_for(device: torch.device, skip: set[str]) -> dict[str, Callable[..., torch.Tensor]]:
    compiled = torch.compile(vz.compress_reference, dynamic=False)
    m: dict[str, Callable[..., torch.Tensor]] = {
        "eager": lambda hidden, attn, keys, w: vz.visionzip_eager(hidden, attn, w.k, keys=keys, has_cls=w.has_cls),
        "compile(reference)": lambda hidden, attn, keys, w: compiled(hidden, attn, w.k, keys=keys, has_cls=w.has_cls),
        "reference": lambda hidden, attn, keys, w: vz.compress_reference(hidden, attn, w.k, keys=keys,
                                                                         has_cls=w.has_cls),
    }
    for backend in vz.available_backends(device):
        if backend == "reference" or (device.type == "cpu" and backend == "triton"):
            continue
        m[backend] = lambda hidden, attn, keys, w, _b=backend: vz.compress(
            hidden, attn, w.k, keys=keys, has_cls=w.has_cls, backend=_b
        )
    return {k: v for k, v in m.items() if k not in skip}


def run(args: argparse.Namespace, on_workload: Callable[[dict], None] | None = None) -> dict:
    """All workloads; ``on_workload(result so far)`` after each one (so a run cut off early keeps
    what it measured)."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    names = args.workloads or (DEFAULT_GPU if device.type == "cuda" else DEFAULT_CPU)
    methods = methods_for(device, set(args.skip))
    bw = copy_bandwidth_gbs(device) if device.type == "cuda" else None
    rows: list[dict] = []
    result = dict(
        machine=machine_name(device),
        device=str(device),
        torch=torch.__version__,
        dtype=args.dtype,
        copy_bandwidth_gbs=bw,
        cpu_isa=cpu_isa_path() if device.type == "cpu" else None,
        copy_bandwidth=("device-to-device copy_ of 256 MiB" if bw is not None else
                        "per workload (rows' copy_gbs): warm copy_ of its largest needed input (hidden; attn "
                        "without CLS) into a pre-allocated tensor, bytes read + written over the median time, "
                        "measured in 5 alternating blocks with the package's kernel (rounds_ms)"),
        workloads={n: asdict(WORKLOADS[n]) for n in names},
        input_sets="CUDA: each call takes the next of several copies of the inputs (>= 4x L2 of bytes moved, "
        "<= 256 copies, <= 8 GB), so that calls stream from device memory; CPU: one set",
        rows=rows,
        note="medians of repeated calls; all methods of a workload measured side by side in one run",
    )
    for name in names:
        w = WORKLOADS[name]
        sets = input_sets(w, dtype, device)
        nxt = itertools.cycle(sets).__next__

        def rotating(f: Callable[[dict], object]) -> Callable[[], object]:
            return lambda: f(nxt())  # each call takes the next input set

        # each method as a call on one input set: timed per call here, replayed in a graph below
        calls = {m: (lambda x, f=fn: f(x["hidden"], x["attn"], x["keys"], w)) for m, fn in methods.items()}
        # the clone floor: one copy of the largest input that must be read whole
        largest = "hidden" if w.has_cls else "attn"
        clone_ms = median_ms(rotating(lambda x: x[largest].clone()), device, args.min_time)
        moved = bytes_moved(w, sets[0]["hidden"].element_size())
        fused = [m for m in calls if m in FUSED] if bw is None else []
        times = {m: median_ms(rotating(call), device, args.min_time) for m, call in calls.items() if m not in fused}
        copy_gbs = None
        if bw is None:
            # CPU: the floor is a warm copy_ of the same bytes (same size, same cache level) into a
            # pre-allocated tensor, measured in alternating blocks with the package's kernel
            src = sets[0][largest]
            dst = torch.empty_like(src)
            both = rounds_ms({"copy_": lambda: dst.copy_(src)} | {m: rotating(calls[m]) for m in fused},
                             args.min_time * (1 + len(fused)))
            copy_gbs = 2 * src.numel() * src.element_size() / (both.pop("copy_") * 1e-3) / 1e9
            times = {m: times[m] if m in times else both[m] for m in calls}  # the table's order
        for mname, ms in times.items():
            row = dict(workload=name, method=mname, ms=ms, speedup_vs_eager=times["eager"] / ms if "eager" in times
                       else None, vs_clone=ms / clone_ms, clone_ms=clone_ms, bytes_moved=moved,
                       gbs=moved / (ms * 1e-3) / 1e9)
            if copy_gbs is not None:
                row["copy_gbs"] = copy_gbs
                row["fraction_of_copy_bw"] = row["gbs"] / copy_gbs
            if bw is not None:
                # the fused kernels' device time (graph replay) measures the kernel against the copy
                # bandwidth; per call (ms) the launch overhead is counted too, as a user pays it
                dev = graph_ms(calls[mname], sets, device, args.min_time) if mname in FUSED else None
                row["device_ms"] = dev
                row["fraction_of_copy_bw"] = moved / ((dev or ms) * 1e-3) / 1e9 / bw
            rows.append(row)
        sets = nxt = None  # free this workload's inputs (the cycle holds them too)
        if on_workload is not None:
            on_workload(result)
    return result


def format_table(result: dict) -> str:
    gpu = result["copy_bandwidth_gbs"] is not None
    cpu_bw = not gpu and any("copy_gbs" in r for r in result["rows"])
    head = f"{'workload':<12} {'method':<19} {'ms':>9} {'x eager':>8} {'x clone':>8} {'MB moved':>9}"
    head += f" {'device ms':>10} {'% copy BW':>9}" if gpu else ""
    head += f" {'GB/s':>7} {'copy GB/s':>9} {'% copy BW':>9}" if cpu_bw else ""
    isa = f", CPU kernels: {result['cpu_isa']}" if result.get("cpu_isa") else ""
    lines = [f"visionzip compress, {result['dtype']}, {result['machine']}, torch {result['torch']}{isa}", head,
             "-" * len(head)]
    for r in result["rows"]:
        line = (f"{r['workload']:<12} {r['method']:<19} {r['ms']:>9.3f} "
                f"{(r['speedup_vs_eager'] or float('nan')):>8.1f} {r['vs_clone']:>8.2f} {r['bytes_moved'] / 1e6:>9.1f}")
        if gpu:
            dev = r.get("device_ms")
            line += f" {dev:>10.3f}" if dev is not None else f" {'-':>10}"
            line += f" {100 * r['fraction_of_copy_bw']:>8.1f}%"
        if cpu_bw and "copy_gbs" in r:
            line += f" {r['gbs']:>7.1f} {r['copy_gbs']:>9.1f} {100 * r['fraction_of_copy_bw']:>8.1f}%"
        lines.append(line)
    if gpu:
        lines.append(f"measured device-to-device copy bandwidth: {result['copy_bandwidth_gbs']:.0f} GB/s; "
                     "% copy BW on device ms (CUDA graph replay) where given, else on ms per call")
    if cpu_bw:
        lines.append("GB/s: MB moved / ms; copy GB/s: warm copy_ of the workload's largest needed input into a "
                     "pre-allocated tensor (read + written), this run")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in result["rows"]))
    methods = [m for m in dict.fromkeys(r["method"] for r in result["rows"]) if m != "eager"]
    fig, ax = plt.subplots(figsize=(1.6 * len(workloads) + 2, 4))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        vals = [next((r["speedup_vs_eager"] for r in result["rows"] if r["workload"] == w and r["method"] == m), 0)
                for w in workloads]
        ax.bar([j + i * width for j in range(len(workloads))], vals, width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(workloads))], workloads)
    ax.set_ylabel("speedup over eager (x)")
    ax.set_yscale("log")
    ax.set_title(f"visionzip compress, {result['dtype']}\n{result['machine']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float32 on CPU, float16 on CUDA")
    p.add_argument("--workloads", nargs="*", choices=sorted(WORKLOADS))
    p.add_argument("--skip", nargs="*", default=[], help="methods to leave out, e.g. reference")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per method and workload")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/compress-<device>-<dtype>.json)")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--no-plot", action="store_true", help="write the JSON but no PNG")
    p.add_argument("--cpu-isa", choices=["baseline", "avx2", "avx512"], default=None,
                   help="the CPU kernels' instruction-set path (VISIONZIP_CPU_ISA; default: the widest the CPU has)")
    args = p.parse_args(argv)
    if args.cpu_isa:
        os.environ["VISIONZIP_CPU_ISA"] = args.cpu_isa  # read once, at the first kernel call (after this)
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    out = None
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        tag = "gpu-" + machine_name(torch.device(args.device)).replace(" ", "_") if args.device.startswith("cuda") \
            else "cpu"
        out = Path(args.out) if args.out else RESULTS / f"compress-{tag}-{args.dtype}.json"

    def progress(partial: dict) -> None:  # print the workload's rows, rewrite the JSON
        last = partial["rows"][-1]["workload"]
        print("\n".join(line for line in format_table(partial).splitlines() if line.startswith(f"{last} ")),
              flush=True)
        if out is not None:
            out.write_text(json.dumps(partial, indent=2) + "\n")

    result = run(args, progress)
    print(format_table(result))
    if out is not None:
        print(f"wrote {out}")
        if not args.no_plot:
            plot(result, out.with_suffix(".png"))
            print(f"wrote {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
