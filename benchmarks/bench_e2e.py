"""End-to-end prefill benchmark of VisionZip in a transformers LLaVA model.

A mid-size random-weight LLaVA: CLIP ViT-L/14 at 336 px (24 layers, width 1024, 577 tokens) and a
Llama of hidden 1024 (12 layers, ~150 M parameters without embeddings; ``--llm 7b`` for LLaVA-1.5-7B's
proportions). One prefill = one forward over ``--batch`` prompts of one image each (vision tower +
projector + LLM, ``logits_to_keep=1``), unpatched and with
VisionZip at budgets 64 / 128 / 192, side by side. Each configuration runs in its own subprocess so
that its peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS, weights included)
is its own. Also timed, in the same process: the vision part alone (``get_image_features``) and the
LLM alone (the same prompt fed as ``inputs_embeds``; values do not change its cost), so the share of
each is visible and the LLM speedup is measured, not inferred.

    python benchmarks/bench_e2e.py                  # table + benchmarks/results/e2e_<machine>.json
    python benchmarks/bench_e2e.py --repeats 2 --note "2 shared cores"
    python benchmarks/bench_e2e.py --device cuda --llm 7b --batch 8   # on a GPU

Random weights: the numbers are about cost, not answers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE_TOKEN = 32000
TEXT_BEFORE, TEXT_AFTER = 35, 20  # a short system prompt + question around the image

#: LLM shapes: "small" is the issue's few-hundred-million-parameter Llama (12 layers by default);
#: "7b" has the proportions of LLaVA-1.5-7B's Vicuna (32 x 4096, ~6.5 B parameters, for a GPU).
LLMS = {
    "small": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_hidden_layers=12),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32),
}


def llm_shape(llm: str, llm_layers: int | None = None) -> dict:
    """The Llama config fields of a preset, with ``llm_layers`` (if given) as its depth."""
    return {**LLMS[llm], **({"num_hidden_layers": llm_layers} if llm_layers else {})}


def build_model(llm: str, llm_layers: int | None, dtype, device, vision_layers: int = 24):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    shape = llm_shape(llm, llm_layers)
    text = LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], vocab_size=32064,
                       max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    # built where it runs, in its dtype: a 7B model initialised on the CPU in float32 takes minutes
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model


def prompt(image_tokens: int, device, batch: int = 1):
    import torch

    g = torch.Generator().manual_seed(1)
    before = torch.randint(10, 30000, (TEXT_BEFORE,), generator=g)
    after = torch.randint(10, 30000, (TEXT_AFTER,), generator=g)
    ids = torch.cat([before, torch.full((image_tokens,), IMAGE_TOKEN), after])[None].repeat(batch, 1).to(device)
    return ids, torch.ones_like(ids)


def run_one(args) -> dict:
    """One configuration (in a fresh process): timings and peak memory."""
    import torch

    from visionzip_kernels.integrations.transformers import apply_visionzip

    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.llm, args.llm_layers, dtype, device, args.vision_layers)
    budget = args.budget
    if budget:
        apply_visionzip(model, budget=budget)
    image_tokens = budget if budget else 576
    ids, mask = prompt(image_tokens, device, args.batch)
    pixels = torch.randn(args.batch, 3, 336, 336, generator=torch.Generator().manual_seed(2)).to(device, dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def prefill():
        return model(input_ids=ids, attention_mask=mask, pixel_values=pixels, logits_to_keep=1, use_cache=True)

    def vision():
        return model.model.get_image_features(pixel_values=pixels, return_dict=True)

    embeds = model.get_input_embeddings()(ids)

    def llm():
        return model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1, use_cache=True)

    def timed(fn) -> list[float]:
        out = []
        for i in range(args.warmup + args.repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= args.warmup:
                out.append((time.perf_counter() - t0) * 1e3)
        return out

    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        total = timed(prefill)
        peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        vis = timed(vision)
        lm = timed(llm)
        seq = ids.shape[1]
    return {
        "budget": budget or None,
        "image_tokens": image_tokens,
        "sequence_length": seq,
        "prefill_ms": statistics.median(total),
        "prefill_ms_all": total,
        "vision_ms": statistics.median(vis),
        "vision_ms_all": vis,
        "llm_ms": statistics.median(lm),
        "llm_ms_all": lm,
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS (weights included)",
    }


def machine(device: str) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="float16 on cuda, float32 on cpu")
    p.add_argument("--llm", choices=sorted(LLMS), default="small", help="LLM shape (default: small)")
    p.add_argument("--llm-layers", type=int, default=0, help="LLM depth (default: the shape's own)")
    p.add_argument("--batch", type=int, default=1, help="prompts (one image each) per prefill")
    p.add_argument("--vision-layers", type=int, default=24, help="tower depth (24: CLIP ViT-L; fewer for a smoke run)")
    p.add_argument("--budgets", default="64,128,192")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. shared machine)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/e2e_<machine>.json)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    if args.one:
        print(json.dumps(run_one(args)))
        return

    rows = []
    for budget in [0] + [int(b) for b in args.budgets.split(",")]:
        cmd = [sys.executable, __file__, "--one", "--budget", str(budget), "--device", args.device,
               "--dtype", args.dtype, "--llm", args.llm, "--llm-layers", str(args.llm_layers),
               "--batch", str(args.batch), "--vision-layers", str(args.vision_layers), "--repeats", str(args.repeats),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            sys.stderr.write(res.stderr)
            raise SystemExit(f"configuration budget={budget or 'none'} failed")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"done: budget={budget or 'unpatched'} prefill {rows[-1]['prefill_ms']:.1f} ms", flush=True)

    base = rows[0]
    for r in rows:
        r["prefill_speedup"] = base["prefill_ms"] / r["prefill_ms"]
        r["llm_speedup"] = base["llm_ms"] / r["llm_ms"]
    info = machine(args.device)
    header = (f"{'config':>12} {'img tok':>8} {'seq':>5} {'prefill ms':>11} {'vision ms':>10} "
              f"{'LLM ms':>9} {'speedup':>8} {'LLM speedup':>12} {'peak MiB':>9}")
    lines = [header]
    for r in rows:
        name = "unpatched" if r["budget"] is None else f"vz k={r['budget']}"
        lines.append(f"{name:>12} {r['image_tokens']:>8} {r['sequence_length']:>5} {r['prefill_ms']:>11.1f} "
                     f"{r['vision_ms']:>10.1f} {r['llm_ms']:>9.1f} {r['prefill_speedup']:>7.2f}x "
                     f"{r['llm_speedup']:>11.2f}x {r['peak_memory_bytes'] / 2**20:>9.0f}")
    table = "\n".join(lines)
    shape = llm_shape(args.llm, args.llm_layers)
    llm_desc = (f"Llama hidden {shape['hidden_size']} x {shape['num_hidden_layers']} layers, intermediate "
                f"{shape['intermediate_size']}, vocab 32064")
    print(f"\nLLaVA (CLIP ViT-L/336 + {llm_desc}, random weights), batch {args.batch}, "
          f"{args.device} {args.dtype}, {info.get('gpu', info['cpu'])}\n{table}")

    tag = (info.get("gpu") or info["cpu"]).lower().replace(" ", "-").replace("/", "-")
    extra = ("" if args.llm == "small" else f"_{args.llm}") + ("" if args.batch == 1 else f"_b{args.batch}")
    name = f"e2e_{args.device.split(':')[0]}_{tag}{extra}.json"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "bench_e2e: LLaVA prefill (vision + LLM, one forward, one image per prompt), VisionZip vs "
                     "unpatched",
        "model": {"vision": f"CLIP ViT-L/14-336 ({args.vision_layers} layers, 1024 wide), random weights",
                  "llm": f"{llm_desc}, random ({args.llm})", "batch": args.batch,
                  "prompt_text_tokens": TEXT_BEFORE + TEXT_AFTER},
        "device": args.device, "dtype": args.dtype, "machine": info, "repeats": args.repeats,
        "warmup": args.warmup, "note": args.note, "results": rows, "table": table,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
