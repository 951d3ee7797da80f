"""Smoke run of benchmarks/bench_vllm.py: a tiny tower and LLM, unpatched and one budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_vllm_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_vllm.py"), "--tiny", "--budgets", "8", "--requests", "2",
           "--output-tokens", "2", "--repeats", "1", "--ttft-repeats", "1", "--eager", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    # 11 text tokens + 16 patches (56 px / 14, CLS dropped) unpatched; + 8 with VisionZip
    assert [(r["budget"], r["prompt_tokens"]) for r in rows] == [(None, 27), (8, 19)]
    assert rows[1]["architecture"] == "VisionZipLlavaForConditionalGeneration"
    assert all(r["requests_per_s"] > 0 and r["llm_prefill_ms"] > 0 and r["encoder_ms"] > 0 for r in rows)
