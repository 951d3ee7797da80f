"""Render a committed bench_compress JSON (benchmarks/results/*.json) as the markdown table used in
README.md, and optionally its bar chart (the GPU script brings back JSONs only).

    python benchmarks/results_table.py benchmarks/results/compress-cpu-float32.json
    python benchmarks/results_table.py --plot benchmarks/results/compress-gpu-*.json   # + <json>.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def markdown(result: dict) -> str:
    gpu = result.get("copy_bandwidth_gbs") is not None
    cpu_bw = not gpu and any("copy_gbs" in r for r in result["rows"])  # CPU: per-workload warm copy_
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    workloads = list(dict.fromkeys(r["workload"] for r in result["rows"]))
    head = "| workload | " + " | ".join(f"{m} ms" for m in methods) + " | best vs eager | best vs compile | best / clone time |"
    head += " best % of copy BW |" if gpu else ""
    head += " best GB/s | copy GB/s | best % of copy BW |" if cpu_bw else ""
    both = any({"cuda", "triton"} <= {r["method"] for r in result["rows"] if r["workload"] == w} for w in workloads)
    head += " triton / cuda time (device) |" if both else ""
    isa = f", CPU kernels: {result['cpu_isa']}" if result.get("cpu_isa") else ""
    lines = [f"{result['machine']}, torch {result['torch']}, {result['dtype']}{isa} (medians, one run)", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for w in workloads:
        rows = {r["method"]: r for r in result["rows"] if r["workload"] == w}
        fused = [m for m in rows if m in ("cpu", "cuda", "triton")]
        best = min(fused, key=lambda m: rows[m]["ms"]) if fused else None
        cells = [f"{rows[m]['ms']:.3f}" if m in rows else "" for m in methods]
        line = f"| {w} | " + " | ".join(cells)
        if best:
            b = rows[best]
            comp = rows.get("compile(reference)")
            vs_comp = f"{comp['ms'] / b['ms']:.1f}x" if comp else ""
            line += f" | {b['speedup_vs_eager']:.1f}x ({best}) | {vs_comp} | {b['vs_clone']:.2f} |"
            line += f" {100 * b['fraction_of_copy_bw']:.0f}% |" if gpu else ""
            if cpu_bw:
                line += (f" {b['gbs']:.1f} | {b['copy_gbs']:.1f} | {100 * b['fraction_of_copy_bw']:.0f}% |"
                         if "copy_gbs" in b else " | | |")
        else:
            line += " | | | |" + (" |" if gpu else "") + (" | | |" if cpu_bw else "")
        if both:
            # kernel against kernel: device time (graph replay) where both have it, else per call
            if {"cuda", "triton"} <= set(rows):
                tri, cu = rows["triton"], rows["cuda"]
                key = "device_ms" if tri.get("device_ms") and cu.get("device_ms") else "ms"
                line += f" {tri[key] / cu[key]:.2f} |"
            else:
                line += " |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    plot = "--plot" in argv
    for path in (a for a in argv if a != "--plot"):
        result = json.loads(Path(path).read_text())
        print(markdown(result))
        print()
        if plot:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from bench_compress import plot as plot_result

            plot_result(result, Path(path).with_suffix(".png"))
            print(f"wrote {Path(path).with_suffix('.png')}")


if __name__ == "__main__":
    main(sys.argv[1:])
