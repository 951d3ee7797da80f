"""Render a committed benchmark JSON (benchmarks/results/*.json) as the markdown table used in README.md.

    python benchmarks/results_table.py benchmarks/results/compress-cpu-float32.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def markdown(result: dict) -> str:
    gpu = result.get("copy_bandwidth_gbs") is not None
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    workloads = list(dict.fromkeys(r["workload"] for r in result["rows"]))
    head = "| workload | " + " | ".join(f"{m} ms" for m in methods) + " | best vs eager | best vs compile | best / clone time |"
    head += " best % of copy BW |" if gpu else ""
    lines = [f"{result['machine']}, torch {result['torch']}, {result['dtype']} (medians, one run)", "", head,
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
        else:
            line += " | | | |" + (" |" if gpu else "")
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(markdown(json.loads(Path(path).read_text())))
        print()
