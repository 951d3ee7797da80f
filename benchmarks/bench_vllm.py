"""Offline vLLM serving benchmark of the VisionZip plugin: LLaVA-1.5 without and with VisionZip at
budgets 64 / 128 / 192, side by side in one run.

The model has LLaVA-1.5's geometry: CLIP ViT-L/14 at 336 px (vLLM builds 23 of its 24 layers, up to
``vision_feature_layer`` -2; 577 tokens a crop) and a Llama of bench_e2e's presets ("small": hidden
1024 x 12 layers; "7b": LLaVA-1.5-7B's 32 x 4096, for a GPU). vLLM fills the weights at random
(``load_format="dummy"``), so only the configuration, the tokenizer and the processor are written;
the numbers are about cost, not answers. A prompt is "USER: <image> ... ASSISTANT:" with 11 text
tokens: 587 prompt tokens without VisionZip, 11 + k with it.

Per configuration, in its own process with a fresh engine:

* prompt tokens per request;
* time to first token of a lone request (``max_tokens=1``, median of ``--ttft-repeats``), with the
  time inside the model's encoder (``embed_multimodal``: tower + VisionZip + projector) and inside its
  language model (``forward``) measured in the worker, so the LLM part of a request is timed directly;
* offline throughput: ``--requests`` requests of one image each submitted together, ``--output-tokens``
  generated per request (requests/s and output tokens/s, median of ``--repeats``).

    python benchmarks/bench_vllm.py                    # CPU: table + benchmarks/results/vllm_<device>_<machine>.json
    python benchmarks/bench_vllm.py --llm 7b --dtype bfloat16 --requests 64   # on a GPU
    python benchmarks/bench_vllm.py --tiny             # smoke run: a tiny tower and LLM, one budget

Needs vLLM and this package installed with its plugin (``make test-vllm`` builds such an environment:
``.venv-vllm/bin/python benchmarks/bench_vllm.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import LLMS, llm_shape, machine  # noqa: E402

WORDS = "<unk> <s> </s> <pad> <image> USER: ASSISTANT: What is shown in this picture , ?".split()
PROMPT = "<s> USER: <image> What is shown in this picture , ? ASSISTANT:"  # 11 text tokens
TEXT_TOKENS = 11
VOCAB = 32064
TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2)


def write_model(out: str, llm: str, tiny: bool) -> None:
    """config.json, tokenizer and processor of the benchmark's LLaVA (no weights: vLLM draws them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor,
                              PreTrainedTokenizerFast)

    vocab = {w: i for i, w in enumerate(WORDS)}
    for i in range(len(vocab), VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    size = 56 if tiny else 336
    if tiny:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=size, patch_size=14)
    else:
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=size, patch_size=14, projection_dim=768)
    shape = TINY if tiny else llm_shape(llm)
    text = LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], vocab_size=VOCAB,
                       max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(out)
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": size},
                                                                  crop_size={"height": size, "width": size}),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    processor.save_pretrained(out)


def images(seed: int, n: int, size: int = 400):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


# ---------------------------------------------------------------------------- in the worker


def install_timers(model) -> str:
    """Wrap the model's encoder and forward with wall-clock timers (synchronised on CUDA)."""
    import torch

    times: dict[str, list] = {"encoder": [], "llm": []}
    model.__dict__["_bench_times"] = times
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
            return out

        return wrapper

    model.embed_multimodal = timed("encoder", model.embed_multimodal)
    model.forward = timed("llm", model.forward)
    return type(model).__name__


def take_times(model) -> dict:
    times = model.__dict__["_bench_times"]
    out = {k: list(v) for k, v in times.items()}
    for v in times.values():
        v.clear()
    return out


# ---------------------------------------------------------------------------- one configuration


def run_one(args) -> dict:
    from vllm import LLM, SamplingParams

    from visionzip_kernels.integrations.vllm import hf_overrides

    # The timers go to the worker pickled by reference, as functions of the importable module
    # bench_vllm (this script is __main__ here; its directory is on the engine processes' sys.path).
    import bench_vllm as timers

    overrides = hf_overrides("LlavaForConditionalGeneration", args.budget) if args.budget else {}
    t0 = time.perf_counter()
    llm = LLM(model=args.model_dir, load_format="dummy", hf_overrides=overrides, dtype=args.dtype,
              max_model_len=1024, max_num_seqs=max(args.requests, 1), enforce_eager=args.eager, seed=0,
              limit_mm_per_prompt={"image": 1}, tensor_parallel_size=args.tp)
    start_s = time.perf_counter() - t0
    arch = llm.apply_model(timers.install_timers)[0]
    seed = iter(range(1000, 10**6, 1000))  # fresh images: an image seen before skips the encoder (cache)

    def requests(n):
        return [{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in images(next(seed), n)]

    first = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate(requests(2), first, use_tqdm=False)  # warm-up
    llm.apply_model(timers.take_times)

    ttft, encoder, lm, prompt_tokens = [], [], [], None
    for _ in range(args.ttft_repeats):
        req = requests(1)
        t = time.perf_counter()
        out = llm.generate(req, first, use_tqdm=False)[0]
        ttft.append((time.perf_counter() - t) * 1e3)
        times = llm.apply_model(timers.take_times)[0]
        encoder.append(sum(times["encoder"]))
        lm.append(sum(times["llm"]))
        prompt_tokens = len(out.prompt_token_ids)

    sampling = SamplingParams(max_tokens=args.output_tokens, min_tokens=args.output_tokens, temperature=0.0)
    walls = []
    for _ in range(args.repeats):
        batch = requests(args.requests)
        t = time.perf_counter()
        outs = llm.generate(batch, sampling, use_tqdm=False)
        walls.append(time.perf_counter() - t)
        assert all(len(o.outputs[0].token_ids) == args.output_tokens for o in outs)
    llm.apply_model(timers.take_times)
    wall = statistics.median(walls)
    llm.llm_engine.engine_core.shutdown()
    return {
        "budget": args.budget or None, "architecture": arch, "prompt_tokens": prompt_tokens,
        "engine_start_s": start_s,
        "ttft_ms": statistics.median(ttft), "ttft_ms_all": ttft,
        "encoder_ms": statistics.median(encoder), "encoder_ms_all": encoder,
        "llm_prefill_ms": statistics.median(lm), "llm_prefill_ms_all": lm,
        "requests_per_s": args.requests / wall, "output_tokens_per_s": args.requests * args.output_tokens / wall,
        "throughput_wall_s_all": walls,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", choices=sorted(LLMS), default="small", help="LLM shape (default: small)")
    p.add_argument("--dtype", default=None, help="float32 on CPU (default), bfloat16 on a GPU")
    p.add_argument("--budgets", default="64,128,192")
    p.add_argument("--requests", type=int, default=8, help="requests per throughput run")
    p.add_argument("--output-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="throughput runs per configuration")
    p.add_argument("--ttft-repeats", type=int, default=3)
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile / CUDA graphs)")
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny tower and LLM")
    p.add_argument("--note", default="", help="free text stored in the JSON")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/vllm_<device>_<machine>.json)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model ships the timers to the worker
    if args.one:
        print(json.dumps(run_one(args)))
        return

    rows = []
    with tempfile.TemporaryDirectory() as model_dir:
        write_model(model_dir, args.llm, args.tiny)
        for budget in [0] + [int(b) for b in args.budgets.split(",")]:
            cmd = [sys.executable, __file__, "--one", "--budget", str(budget), "--model-dir", model_dir,
                   "--dtype", args.dtype, "--requests", str(args.requests), "--output-tokens", str(args.output_tokens),
                   "--repeats", str(args.repeats), "--ttft-repeats", str(args.ttft_repeats), "--tp", str(args.tp)]
            cmd += ["--eager"] if args.eager else []
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                sys.stderr.write(res.stderr[-5000:])
                raise SystemExit(f"configuration budget={budget or 'none'} failed")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"done: {'unpatched' if not budget else f'k={budget}'}: {rows[-1]['prompt_tokens']} prompt tokens, "
                  f"TTFT {rows[-1]['ttft_ms']:.0f} ms, {rows[-1]['requests_per_s']:.3f} req/s", flush=True)

    base = rows[0]
    for r in rows:
        r["throughput_speedup"] = r["requests_per_s"] / base["requests_per_s"]
        r["ttft_speedup"] = base["ttft_ms"] / r["ttft_ms"]
        r["llm_speedup"] = base["llm_prefill_ms"] / r["llm_prefill_ms"]
    info = machine(device)
    import vllm

    info["vllm"] = vllm.__version__
    header = (f"{'config':>10} {'prompt tok':>10} {'TTFT ms':>9} {'encoder ms':>10} {'LLM ms':>8} {'req/s':>7} "
              f"{'out tok/s':>9} {'req/s x':>8} {'TTFT x':>7} {'LLM x':>6}")
    lines = [header]
    for r in rows:
        name = "unpatched" if r["budget"] is None else f"vz k={r['budget']}"
        lines.append(f"{name:>10} {r['prompt_tokens']:>10} {r['ttft_ms']:>9.0f} {r['encoder_ms']:>10.0f} "
                     f"{r['llm_prefill_ms']:>8.0f} {r['requests_per_s']:>7.3f} {r['output_tokens_per_s']:>9.1f} "
                     f"{r['throughput_speedup']:>7.2f}x {r['ttft_speedup']:>6.2f}x {r['llm_speedup']:>5.2f}x")
    table = "\n".join(lines)
    shape = TINY if args.tiny else llm_shape(args.llm)
    llm_desc = f"Llama hidden {shape['hidden_size']} x {shape['num_hidden_layers']} layers, vocab {VOCAB}"
    tower = "tiny CLIP (56 px, 3 layers)" if args.tiny else "CLIP ViT-L/14-336"
    print(f"\nvLLM {vllm.__version__}, LLaVA ({tower} + {llm_desc}, random weights), {device} {args.dtype}, "
          f"TP {args.tp}, {args.requests} requests x {args.output_tokens} output tokens, "
          f"{info.get('gpu', info['cpu'])} ({info['cpu_count']} CPUs)\n{table}")
    if args.tiny and args.out is None:
        return
    tag = (info.get("gpu") or info["cpu"]).lower().replace(" ", "-").replace("/", "-")
    extra = "" if args.llm == "small" else f"_{args.llm}"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"vllm_{device}_{tag}{extra}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "bench_vllm: offline vLLM serving of LLaVA, VisionZip plugin vs unpatched",
        "model": {"vision": tower, "llm": llm_desc + f" ({'tiny' if args.tiny else args.llm})",
                  "weights": "random (vLLM load_format=dummy)", "prompt_text_tokens": TEXT_TOKENS},
        "settings": {"requests": args.requests, "output_tokens": args.output_tokens, "repeats": args.repeats,
                     "ttft_repeats": args.ttft_repeats, "tp": args.tp, "enforce_eager": args.eager,
                     "dtype": args.dtype, "device": device},
        "machine": info, "note": args.note, "results": rows, "table": table,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
