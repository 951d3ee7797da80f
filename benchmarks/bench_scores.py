"""VisionZip on a full-size CLIP ViT-L/14-336 tower: the original pipeline vs SDPA + scores from q/k.

(a) eager: the tower with eager attention and ``output_attentions=True`` (what the official code
    forces: every layer materialises B x 16 x 577 x 577 probabilities), then ``compress`` with the
    selection layer's (index -2) attention;
(b) sdpa:  the same tower with ``attn_implementation="sdpa"``; forward hooks on the selection
    layer's ``q_proj`` / ``k_proj`` capture its queries and keys, ``cls_scores`` turns the CLS
    query and the keys into (B, N) scores, then the same ``compress``.

Both run the whole tower with ``output_hidden_states=True`` (LLaVA reads hidden_states[-2]) and
both take the metric keys (keys averaged over heads) from the k_proj hook, so the only difference is
the attention implementation and where the scores come from. Weights are random (no download):
same seed, same weights in both. Budget k = 64 (54 dominant + 10 contextual).

Each (pipeline, batch) runs in its own subprocess, which reports
* time: median wall time of tower + scores + compress over --repeats calls (after one untimed call);
* peak memory: CPU: growth of the resident-set high-water mark (VmHWM, reset through
  /proc/self/clear_refs) over the resident set right before the first call, i.e. the extra memory
  one call needs beyond the loaded model; and the process's peak RSS (model weights included).
  CUDA: torch.cuda.max_memory_allocated over the call, beyond what was allocated before.
  (tracemalloc does not see torch's allocations.)

    python benchmarks/bench_scores.py                 # B = 1 and B = 8, table + JSON in benchmarks/results/
    python benchmarks/bench_scores.py --batch 8 --repeats 2

``--kernels`` times the score kernels alone instead (cls_scores / received_scores on CPU at the
shapes of CLIP-L/336 and SigLIP-so400m/384 selection layers) and states their FLOP rate against the
CPU's measured float32 FMA peak (benchmarks/cpu_peak.py) and cls_scores' read rate against a warm
copy_ of k; ``--cpu-isa baseline|avx2|avx512`` runs the kernels' given instruction-set path
(VISIONZIP_CPU_ISA, see csrc/cpu/isa.h):

    python benchmarks/bench_scores.py --kernels                     # JSON: scores_kernels_cpu_<cpu>.json
    python benchmarks/bench_scores.py --kernels --cpu-isa avx2 --out /tmp/avx2.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

# CLIP ViT-L/14 at 336 px (the LLaVA-1.5 tower).
CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)
PIPELINES = ("eager", "sdpa")


# --------------------------------------------------------------------------------------------
# Worker: one (pipeline, batch) configuration per process
# --------------------------------------------------------------------------------------------


def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_tower(attn_implementation: str, layers: int):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(**{**CLIP_L_336, "num_hidden_layers": layers})
    torch.manual_seed(0)
    # A config object of its own: _from_config records the attention implementation in it.
    return CLIPVisionModel._from_config(copy.deepcopy(cfg), attn_implementation=attn_implementation).eval()


class SelectionLayerCapture:
    """Forward hooks on the selection layer's q_proj / k_proj: their (B, N, C) outputs."""

    def __init__(self, model, layer_index: int = -2):
        encoder = getattr(model, "vision_model", model).encoder  # transformers 4 / 5 layouts
        self.attn = encoder.layers[layer_index].self_attn
        self.out: dict[str, torch.Tensor] = {}
        self.hooks = [
            self.attn.q_proj.register_forward_hook(lambda m, i, o: self.out.__setitem__("q", o)),
            self.attn.k_proj.register_forward_hook(lambda m, i, o: self.out.__setitem__("k", o)),
        ]

    def per_head(self, name: str) -> torch.Tensor:
        """(B, H, N, d) view of the captured projection (no copy)."""
        x = self.out[name]
        b, n, _ = x.shape
        return x.view(b, n, self.attn.num_heads, self.attn.head_dim).transpose(1, 2)


def run_pipeline(pipeline: str, model, cap: SelectionLayerCapture, pixels: torch.Tensor, budget: int):
    import visionzip_kernels as vz

    if pipeline == "eager":
        out = model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
        attn = out.attentions[-2]  # (B, H, N, N)
    else:
        out = model(pixel_values=pixels, output_hidden_states=True)
        q_cls = cap.per_head("q")[:, :, 0]  # (B, H, d): the CLS query only
        attn = vz.cls_scores(q_cls, cap.per_head("k"), scale=cap.attn.scale)  # (B, N)
    hidden = out.hidden_states[-2]  # output of the selection layer (B, N, C)
    keys = cap.per_head("k").mean(dim=1)  # VisionZip's metric: keys averaged over heads, (B, N, d)
    return vz.compress(hidden, attn, budget, keys=keys, return_indices=True)


def worker(args) -> dict:
    sys.path.insert(0, ROOT)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = build_tower(args.pipeline, args.layers).to(device, dtype)
    cap = SelectionLayerCapture(model)
    g = torch.Generator().manual_seed(1)
    size = CLIP_L_336["image_size"]
    pixels = torch.randn(args.batch, 3, size, size, generator=g).to(device, dtype)
    cuda = device.type == "cuda"

    def call():
        with torch.inference_mode():
            res = run_pipeline(args.pipeline, model, cap, pixels, args.k)
        if cuda:
            torch.cuda.synchronize()
        cap.out.clear()
        return res

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _proc_status()["VmRSS"]
        process_peak = _proc_status()["VmHWM"]
        _reset_hwm()
    t0 = time.perf_counter()
    res = call()  # first call: measured for memory (nothing cached yet), not timed
    first_s = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated() - before
    else:
        st = _proc_status()
        peak = st["VmHWM"] - before
        process_peak = max(process_peak, st["VmHWM"])
    dominant = res.dominant_indices.cpu().tolist()
    del res

    times = []
    for _ in range(args.repeats):
        gc.collect()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    if not cuda:
        process_peak = max(process_peak, _proc_status()["VmHWM"])
    return dict(
        pipeline=args.pipeline,
        batch=args.batch,
        median_s=statistics.median(times),
        times_s=times,
        first_call_s=first_s,
        peak_mib=peak / 2**20,
        process_peak_rss_mib=None if cuda else process_peak / 2**20,
        dominant_indices=dominant,
    )


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def machine_info(device: str) -> dict:
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = dict(
        processor=platform.processor(),
        cpu_model=cpu_model,
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        device=device,
    )
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_config(args, pipeline: str, batch: int) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker",
        "--pipeline", pipeline, "--batch", str(batch), "--repeats", str(args.repeats),
        "--k", str(args.k), "--layers", str(args.layers), "--device", args.device, "--dtype", args.dtype,
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"worker {pipeline} B={batch} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of dominant indices the two pipelines share (their attention differs by rounding)."""
    same = sum(len(set(x) & set(y)) for x, y in zip(a, b))
    return same / max(1, sum(len(x) for x in a))


# --------------------------------------------------------------------------------------------
# --kernels: the score kernels alone
# --------------------------------------------------------------------------------------------

# (name, B, H, N, d): selection layers of CLIP ViT-L/14-336 (LLaVA-1.5) and SigLIP-so400m/384 (no CLS)
KERNEL_SHAPES = [
    ("clip-l/336", 1, 16, 577, 64),
    ("clip-l/336", 8, 16, 577, 64),
    ("siglip-so400m/384", 1, 16, 729, 72),
]


def _median_min_ms(fn, min_time: float) -> tuple[float, float]:
    for _ in range(2):
        fn()
    times: list[float] = []
    t_end = time.perf_counter() + min_time
    while len(times) < 5 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def kernel_bench(args) -> dict:
    """cls_scores / received_scores alone on CPU: time, FLOP rate against the measured FMA peak,
    cls_scores' read rate against a warm copy_ of k."""
    sys.path.insert(0, ROOT)
    import visionzip_kernels as vz

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import cpu_peak  # noqa: E402  (benchmarks/ on the path)

    threads = torch.get_num_threads()
    peaks = cpu_peak.fma_peak_gflops(threads)
    flags = cpu_peak.cpu_flags()
    widest = "avx512" if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags else (
        "avx2" if {"avx2", "fma"} <= flags else "baseline")
    isa = os.environ.get("VISIONZIP_CPU_ISA") or widest
    peak = peaks.get(isa) if isa != "baseline" else None  # baseline: SSE2, no FMA instruction
    dtype = getattr(torch, args.dtype)
    rows = []
    for name, b, h, n, d in KERNEL_SHAPES:
        g = torch.Generator().manual_seed(0)
        q = (torch.randn(b, h, n, d, generator=g) * 1.5).to(dtype)
        k = torch.randn(b, h, n, d, generator=g).to(dtype)
        dst = torch.empty_like(k)
        copy_ms, _ = _median_min_ms(lambda: dst.copy_(k), args.min_time)
        copy_gbs = 2 * k.numel() * k.element_size() / (copy_ms * 1e-3) / 1e9
        for op in ("received_scores", "cls_scores"):
            if op == "received_scores":
                fn = lambda: vz.received_scores(q, k, backend="cpu")  # noqa: E731
                flop = 2 * b * h * n * n * d  # Q K^T once: the matmul the column sums need
                exps = b * h * n * n
            else:
                qc = q[:, :, 0]
                fn = lambda: vz.cls_scores(qc, k, backend="cpu")  # noqa: E731
                flop, exps = 2 * b * h * n * d, b * h * n
            ms, ms_min = _median_min_ms(fn, args.min_time)
            row = dict(op=op, shape=name, batch=b, heads=h, tokens=n, head_dim=d, ms=ms, ms_min=ms_min, flop=flop,
                       exps=exps, gflops=flop / (ms * 1e-3) / 1e9)
            row["fraction_of_fma_peak"] = row["gflops"] / peak if peak else None
            if op == "cls_scores":  # O(N d): bound by reading k
                row["k_gbs"] = k.numel() * k.element_size() / (ms * 1e-3) / 1e9
                row["copy_gbs"] = copy_gbs
                row["fraction_of_copy_bw"] = row["k_gbs"] * 2 / copy_gbs  # copy_ moves k twice (read + write)
            rows.append(row)
            frac = f"{100 * row['fraction_of_fma_peak']:.0f}% of FMA peak" if peak else "no FMA peak"
            extra = (f", k read at {row['k_gbs']:.1f} GB/s (copy_ of k: {copy_gbs:.1f} GB/s read + written)"
                     if op == "cls_scores" else "")
            print(f"{op:<16} {name:<18} B={b:<2} N={n} d={d}: {ms:8.3f} ms (min {ms_min:.3f}), "
                  f"{row['gflops']:7.1f} GFLOP/s, {frac}{extra}", flush=True)
    return dict(isa=isa, fma_peak_gflops_float32=peaks, threads=threads, dtype=args.dtype, rows=rows,
                flop_note="received_scores: 2 B H N^2 d (one Q K^T), cls_scores: 2 B H N d; an FMA counts 2; "
                          "exp evaluations not counted as FLOPs (column exps)",
                peak_note="register-resident FMA chains on all torch threads (benchmarks/cpu_peak.py), "
                          "for the instruction set of the kernels' path")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default=None, help="batch sizes, comma separated (default: 1,8 on cpu, 1,8,32 on cuda)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per configuration, after one untimed call (default: 3 on cpu, 20 on cuda)")
    p.add_argument("--k", type=int, default=64, help="VisionZip budget (default 64 = 54 + 10)")
    p.add_argument("--layers", type=int, default=CLIP_L_336["num_hidden_layers"], help="tower depth (24: CLIP-L)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="weights and activations (default: float16 on cuda, float32 on cpu)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/bench_scores_<machine>.json)")
    p.add_argument("--kernels", action="store_true", help="time the CPU score kernels alone (see above)")
    p.add_argument("--cpu-isa", choices=["baseline", "avx2", "avx512"], default=None,
                   help="with --kernels: the kernels' instruction-set path (default: the widest the CPU has)")
    p.add_argument("--min-time", type=float, default=1.0, help="with --kernels: seconds of timed calls per row")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pipeline", choices=PIPELINES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    args.batch = args.batch or ("1,8,32" if cuda else "1,8")
    args.repeats = args.repeats or (20 if cuda else 3)

    if args.kernels:
        if args.cpu_isa:
            os.environ["VISIONZIP_CPU_ISA"] = args.cpu_isa  # read at the first kernel call, below
        info = machine_info("cpu")
        print(f"# {info['cpu_model']} ({info['cpu_count']} CPUs, {info['torch_threads']} torch threads), "
              f"torch {info['torch']}, {args.dtype}")
        res = kernel_bench(args)
        print(f"# path {res['isa']}; measured FMA peak (float32, {res['threads']} threads): "
              + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in res["fma_peak_gflops_float32"].items()))
        os.makedirs(RESULTS, exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", info["cpu_model"].lower()).strip("-")
        path = args.out or os.path.join(RESULTS, f"scores_kernels_cpu_{slug}_{info['cpu_count']}cpu.json")
        with open(path, "w") as f:
            json.dump(dict(benchmark="bench_scores --kernels", date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           machine=info, **res), f, indent=2)
        print(f"wrote {os.path.relpath(path, ROOT)}")
        return

    if args.worker:
        batch = int(args.batch)
        args.batch = batch
        print(json.dumps(worker(args)))
        return

    batches = [int(b) for b in str(args.batch).split(",") if b]
    info = machine_info(args.device)
    print(f"# {info['cpu_model']} ({info['cpu_count']} CPUs, {info['torch_threads']} torch threads), torch {info['torch']}"
          + (f", {info['gpu']}" if "gpu" in info else ""))
    print(f"# CLIP ViT-L/14-336 ({args.layers} layers, random weights, {args.dtype}), k={args.k}, "
          f"median of {args.repeats} calls")
    rows = []
    for batch in batches:
        res = {pl: run_config(args, pl, batch) for pl in PIPELINES}
        e, s = res["eager"], res["sdpa"]
        rows.append(
            dict(
                batch=batch,
                eager=e,
                sdpa=s,
                speedup=e["median_s"] / s["median_s"],
                peak_ratio=s["peak_mib"] / e["peak_mib"] if e["peak_mib"] > 0 else None,
                process_peak_ratio=(
                    s["process_peak_rss_mib"] / e["process_peak_rss_mib"] if e["process_peak_rss_mib"] else None
                ),
                dominant_agreement=_agreement(e.pop("dominant_indices"), s.pop("dominant_indices")),
            )
        )
        r = rows[-1]
        print(
            f"B={batch}: eager {e['median_s']:.3f} s, peak +{e['peak_mib']:.0f} MiB | "
            f"sdpa+cls_scores {s['median_s']:.3f} s, peak +{s['peak_mib']:.0f} MiB | "
            f"speedup {r['speedup']:.2f}x, peak ratio {r['peak_ratio']:.3f}, "
            f"dominant agreement {r['dominant_agreement']:.3f}",
            flush=True,
        )

    mem = "peak RSS growth" if args.device == "cpu" else "peak allocated"
    print()
    print(f"| B | pipeline | median time (s) | {mem} (MiB) | process peak RSS (MiB) | speedup | peak ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for name, key in (("eager attention + output_attentions", "eager"), ("SDPA + cls_scores", "sdpa")):
            x = r[key]
            rss = "-" if x["process_peak_rss_mib"] is None else f"{x['process_peak_rss_mib']:.0f}"
            extra = (f"{r['speedup']:.2f}x", f"{r['peak_ratio']:.3f}") if key == "sdpa" else ("", "")
            print(f"| {r['batch']} | {name} | {x['median_s']:.3f} | {x['peak_mib']:.0f} | {rss} | {extra[0]} | {extra[1]} |")

    os.makedirs(RESULTS, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", (info.get("gpu") or info["cpu_model"]).lower()).strip("-")
    path = args.out or os.path.join(RESULTS, f"bench_scores_{args.device}_{slug}_{info['cpu_count']}cpu.json")
    with open(path, "w") as f:
        json.dump(
            dict(
                benchmark="bench_scores",
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                machine=info,
                config=dict(tower="CLIP ViT-L/14-336", layers=args.layers, k=args.k, repeats=args.repeats,
                            dtype=args.dtype),
                memory_metric=(
                    "VmHWM growth over VmRSS before the first call (CPU), max_memory_allocated growth (CUDA)"
                ),
                results=rows,
            ),
            f,
            indent=2,
        )
    print(f"\nwrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
