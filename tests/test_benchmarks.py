"""Smoke tests of the benchmark scripts: they must run and report what they claim, since their output
is what the README's numbers come from (speed itself is measured by running them, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_compress  # noqa: E402
import results_table  # noqa: E402


def test_bench_compress_runs_and_reports_every_method(tmp_path):
    out = tmp_path / "r.json"
    result = bench_compress.main(["--device", "cpu", "--workloads", "llava15", "siglip384", "--skip",
                                  "compile(reference)", "--min-time", "0", "--out", str(out), "--no-plot"])
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"]
    methods = {(r["workload"], r["method"]) for r in saved["rows"]}
    for w in ("llava15", "siglip384"):
        assert {(w, "eager"), (w, "reference"), (w, "cpu")} <= methods
    for r in saved["rows"]:
        assert r["ms"] > 0 and r["clone_ms"] > 0 and r["bytes_moved"] > 0
        assert r["speedup_vs_eager"] == pytest.approx(
            next(x["ms"] for x in saved["rows"] if x["workload"] == r["workload"] and x["method"] == "eager") / r["ms"]
        )
    for r in saved["rows"]:  # CPU bandwidth column: GB/s on the bytes moved, against a warm copy_ of this run
        assert r["copy_gbs"] > 0 and r["gbs"] == pytest.approx(r["bytes_moved"] / r["ms"] / 1e6)
        assert r["fraction_of_copy_bw"] == pytest.approx(r["gbs"] / r["copy_gbs"])
    table = results_table.markdown(saved)
    assert table.count("\n| llava15 |") == 1 and "(cpu)" in table and "best % of copy BW" in table
    assert "% copy BW" in bench_compress.format_table(saved)


def test_bench_compress_bytes_moved():
    w = bench_compress.WORKLOADS["llava15"]
    # hidden read + CLS rows of the heads + keys read + output written, 2-byte elements, + int64 indices
    expected = 2 * (577 * 1024 + 16 * 577 + 577 * 64 + 64 * 1024) + 8 * (64 + 577)
    assert bench_compress.bytes_moved(w, 2) == expected
    w = bench_compress.WORKLOADS["siglip384"]  # no CLS: the whole matrix must be read
    assert bench_compress.bytes_moved(w, 4) == 4 * (729 * 1152 + 16 * 729 * 729 + 729 * 72 + 64 * 1152) + 8 * (
        64 + 729)


def test_input_sets_one_on_cpu():
    sets = bench_compress.input_sets(bench_compress.WORKLOADS["llava15"], torch.float32, torch.device("cpu"))
    assert len(sets) == 1 and sets[0]["attn"].shape == (1, 16, 577, 577)


def test_results_table_gpu_columns(tmp_path):
    rows = []
    for w, (tri, cu) in {"llava15": (0.02, 0.01), "video": (0.2, 0.25)}.items():
        for m, ms in (("eager", 5.0), ("compile(reference)", 1.0), ("triton", tri), ("cuda", cu)):
            rows.append(dict(workload=w, method=m, ms=ms, speedup_vs_eager=5.0 / ms, vs_clone=ms / 0.1,
                             clone_ms=0.1, bytes_moved=10**6, fraction_of_copy_bw=0.5))
    result = dict(machine="NVIDIA H100 80GB HBM3", torch="2.x", dtype="float16", copy_bandwidth_gbs=3000.0,
                  rows=rows)
    for r in rows:
        r["device_ms"] = None
    for r in rows:  # llava15: device times give another ratio (3.00) than the per-call ones (2.00)
        if r["workload"] == "llava15" and r["method"] in ("triton", "cuda"):
            r["device_ms"] = 0.006 if r["method"] == "triton" else 0.002
    table = results_table.markdown(result)
    lines = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert "triton / cuda time" in lines["| workload"] and "% of copy BW" in lines["| workload"]
    assert "500.0x (cuda)" in lines["| llava15"] and lines["| llava15"].endswith(" 3.00 |")
    assert "25.0x (triton)" in lines["| video"] and lines["| video"].endswith(" 0.80 |")
    rows[-1]["device_ms"], rows[-2]["device_ms"] = 0.2, None
    text = bench_compress.format_table(result)
    assert "device ms" in text and "% copy BW" in text and "3000 GB/s" in text
    assert [ln.split()[6] for ln in text.splitlines() if ln.startswith("video") and "triton" in ln] == ["-"]
    assert [ln.split()[6] for ln in text.splitlines() if ln.startswith("video") and "cuda" in ln] == ["0.200"]
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(result))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "results_table.py"), "--plot", str(path)],
                         capture_output=True, text=True, check=True)
    assert "triton / cuda time" in res.stdout and path.with_suffix(".png").stat().st_size > 0


def test_committed_results_render():
    files = sorted((ROOT / "benchmarks" / "results").glob("compress-*.json"))
    assert files, "no committed compress results"
    for f in files:
        assert "| llava15 |" in results_table.markdown(json.loads(f.read_text()))


def test_gpu_script_parses_and_lists_its_stages():
    script = ROOT / "benchmarks" / "gpu_all.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    res = subprocess.run(["bash", str(script), "no-such-stage"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "OUT": "/tmp/vz-gpu-all-test", "PYTHON": sys.executable})
    assert res.returncode == 2 and "stages: build gpu-tests" in res.stdout


def test_bench_scores_smoke(tmp_path):
    """Two-layer tower, B=1, one timed call per pipeline: the script runs and both pipelines agree."""
    import bench_scores

    out = tmp_path / "scores.json"
    bench_scores.main(["--device", "cpu", "--layers", "2", "--batch", "1", "--repeats", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["config"]["dtype"] == "float32" and res["config"]["layers"] == 2
    (row,) = res["results"]
    assert row["batch"] == 1 and row["eager"]["median_s"] > 0 and row["sdpa"]["median_s"] > 0
    assert row["dominant_agreement"] == 1.0


def test_bench_e2e_smoke(tmp_path):
    """Tiny LLaVA (two tower layers, one LLM layer), batch 2, unpatched and k=64: prefill, vision and LLM
    timed."""
    out = tmp_path / "e2e.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--device", "cpu", "--batch", "2",
                    "--vision-layers", "2", "--llm-layers", "1", "--budgets", "64", "--repeats", "1", "--warmup", "0",
                    "--out", str(out)], check=True, capture_output=True, text=True)
    res = json.loads(out.read_text())
    assert res["model"]["batch"] == 2 and "x 1 layers" in res["model"]["llm"]
    base, vz = res["results"]
    assert (base["budget"], base["image_tokens"], vz["budget"], vz["image_tokens"]) == (None, 576, 64, 64)
    assert vz["sequence_length"] == base["sequence_length"] - 512
    for r in (base, vz):
        assert r["prefill_ms"] > 0 and r["vision_ms"] > 0 and r["llm_ms"] > 0 and r["llm_speedup"] > 0


def test_bench_e2e_7b_shape():
    """The 7B-proportioned LLM preset (for a GPU run), built on the meta device: shapes only."""
    import bench_e2e  # benchmarks/ is on sys.path (module top)

    model = bench_e2e.build_model("7b", 2, torch.float16, "meta", vision_layers=1)
    text = model.config.text_config
    assert (text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_hidden_layers) == (
        4096, 11008, 32, 2)
    assert next(model.parameters()).dtype == torch.float16 and torch.get_default_dtype() == torch.float32
    assert bench_e2e.LLMS["7b"]["num_hidden_layers"] == 32


def test_bench_group_pool_smoke(tmp_path):
    """A small shape, no compile: every method timed side by side, all computing the oracle's output,
    the table rendered and the JSON written."""
    import bench_group_pool

    out = tmp_path / "gp.json"
    result = bench_group_pool.main(["--device", "cpu", "--batch", "2", "--patches", "50", "--groups", "7",
                                    "--channels", "16", "--skip", "compile(dense)", "--min-time", "0",
                                    "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"] and saved["machine"]
    assert {r["method"] for r in saved["rows"]} == {"dense-eager", "cpu"}
    for r in saved["rows"]:
        assert r["ms"] > 0 and r["max_abs_diff_vs_reference"] < 1e-5
    assert "| cpu |" in bench_group_pool.markdown(saved)
    name = bench_group_pool.default_out(saved).name  # the CPU's model name, without the core counts
    assert name.startswith("group_pool-cpu-") and name.endswith(f"-{torch.get_num_threads()}t-float32.json")
    assert "cores" not in name


def test_profile_compress_cpu_smoke(tmp_path):
    """One workload, one call: every phase reported per image, the real kernel timed, the table and
    the JSON written."""
    import profile_compress_cpu

    out = tmp_path / "profile.json"
    result = profile_compress_cpu.main(["--workloads", "llava15", "--calls", "1", "--min-time", "0",
                                        "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"] and saved["machine"] and saved["cpu_isa"]
    (row,) = saved["rows"]
    assert list(row["phases_us_per_image"]) == list(profile_compress_cpu.PHASES)
    assert all(v > 0 for v in row["phases_us_per_image"].values())
    assert row["compress_1t_us_per_image"] > 0 and row["compress_all_threads_ms"] > 0 and row["pass_read_gbs"] > 0
    assert "| llava15 | 1 |" in profile_compress_cpu.format_table(saved)
