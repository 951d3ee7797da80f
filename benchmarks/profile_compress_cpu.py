"""Where the CPU compress kernel's time goes, phase by phase (docs/spec.md "Compress").

    python benchmarks/profile_compress_cpu.py                     # float32: llava15, llava15-b8, video, siglip384
    python benchmarks/profile_compress_cpu.py --dtype bfloat16 --workloads video

``visionzip::_compress_cpu_phases`` runs the kernel's own code with each phase timed on its own, the
images one after another on one thread and nothing overlapped: scores (the CLS rows, or the whole
received-attention matrix without CLS), selection, targets, assignment, slots (the token map and
counts), and the pass over hidden (dominant and target rows copied, the other tokens summed into
their target). Printed per image in microseconds (medians over calls), with the pass's read rate
(hidden bytes / pass time) next to a warm one-thread ``copy_`` of one image's hidden states, and
the real kernel's time per image at one thread (where the next image's plan is built during the
pass over the current one) and at all threads. Writes JSON to benchmarks/results/ named after the
CPU (lscpu's model name) and the dtype.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import visionzip_kernels as vz  # noqa: E402,F401  (loads the extension)
from bench_compress import RESULTS, WORKLOADS, cpu_isa_path, machine_name, make_inputs, median_ms  # noqa: E402

PHASES = ("scores", "selection", "targets", "assignment", "slots", "pass")
DEFAULT = ["llava15", "llava15-b8", "video", "siglip384"]


def phase_us(inputs: dict, k: int, has_cls: bool, calls: int) -> dict[str, float]:
    """Median over ``calls`` of each phase's time per image, in microseconds."""
    op = torch.ops.visionzip._compress_cpu_phases
    args = (inputs["hidden"], inputs["attn"], k)
    op(*args, keys=inputs["keys"], has_cls=has_cls)  # warm-up: scratch buffers, caches
    runs = [op(*args, keys=inputs["keys"], has_cls=has_cls)[0] for _ in range(calls)]
    per_image = torch.stack(runs).median(dim=0).values / inputs["hidden"].shape[0] * 1e6
    return dict(zip(PHASES, per_image.tolist()))


def profile(name: str, dtype: torch.dtype, calls: int, min_time: float) -> dict:
    w = WORKLOADS[name]
    x = make_inputs(w, dtype, torch.device("cpu"))
    threads = torch.get_num_threads()
    row: dict = dict(workload=name, batch=w.batch, tokens=w.tokens, channels=w.channels, has_cls=w.has_cls)
    try:
        torch.set_num_threads(1)
        row["phases_us_per_image"] = phase_us(x, w.k, w.has_cls, calls)
        fn = lambda: vz.compress(x["hidden"], x["attn"], w.k, keys=x["keys"], has_cls=w.has_cls, backend="cpu")  # noqa: E731
        row["compress_1t_us_per_image"] = median_ms(fn, torch.device("cpu"), min_time) * 1e3 / w.batch
        image = x["hidden"][0]
        dst = torch.empty_like(image)
        copy_ms = median_ms(lambda: dst.copy_(image), torch.device("cpu"), min_time)
        row["copy_1t_gbs"] = 2 * image.numel() * image.element_size() / copy_ms / 1e6  # read + written
    finally:
        torch.set_num_threads(threads)
    row["compress_all_threads_ms"] = median_ms(fn, torch.device("cpu"), min_time)
    hidden_bytes = x["hidden"][0].numel() * x["hidden"].element_size()
    row["pass_read_gbs"] = hidden_bytes / row["phases_us_per_image"]["pass"] / 1e3
    row["phases_sum_us_per_image"] = sum(row["phases_us_per_image"].values())
    return row


def format_table(result: dict) -> str:
    head = ["workload", "B"] + [f"{p} us" for p in PHASES] + [
        "sum us", "pass GB/s (copy_ GB/s)", "kernel 1 thread us", "kernel all threads ms"]
    lines = [f"{result['machine']}, torch {result['torch']}, {result['dtype']}, CPU kernels: {result['cpu_isa']} "
             "(per image, medians; phases timed one by one on one thread)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        ph = r["phases_us_per_image"]
        cells = [r["workload"], str(r["batch"])] + [f"{ph[p]:.1f}" for p in PHASES] + [
            f"{r['phases_sum_us_per_image']:.1f}", f"{r['pass_read_gbs']:.1f} ({r['copy_1t_gbs']:.1f})",
            f"{r['compress_1t_us_per_image']:.1f}", f"{r['compress_all_threads_ms']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--workloads", nargs="*", default=DEFAULT, choices=sorted(WORKLOADS))
    p.add_argument("--calls", type=int, default=30, help="calls of the phase-timed op per workload")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls of the real kernel")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/profile-compress-cpu-<cpu>-<dtype>.json)")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error(f"--calls must be >= 1; got {args.calls}")
    dtype = getattr(torch, args.dtype)
    result = dict(machine=machine_name(torch.device("cpu")), torch=torch.__version__, dtype=args.dtype,
                  cpu_isa=cpu_isa_path(), date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), phases=list(PHASES),
                  rows=[profile(name, dtype, args.calls, args.min_time) for name in args.workloads])
    print(format_table(result))
    if not args.no_save:
        cpu = re.sub(r"[^a-z0-9]+", "-", result["machine"].split(" (")[0].lower()).strip("-")
        out = Path(args.out) if args.out else RESULTS / f"profile-compress-cpu-{cpu}-{args.dtype}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
