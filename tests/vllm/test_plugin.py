"""The plugin's registration and helpers, without an engine."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from visionzip_kernels.integrations.vllm import ARCHITECTURES, hf_overrides
from visionzip_kernels.integrations.vllm.base import (
    POSITION_CHANNELS,
    attach_positions,
    detach_positions,
    untested_vllm,
)

REGISTER = """
import sys
from vllm.plugins import load_general_plugins
load_general_plugins()                                  # vLLM's own loader: runs the entry point
import visionzip_kernels.integrations.vllm as plugin
plugin.register()                                       # again: overwrites the same entries
from vllm import ModelRegistry
archs = set(ModelRegistry.get_supported_archs())
assert {a for a, _ in plugin.ARCHITECTURES.values()} <= archs, archs
names = ("llava", "qwen2_vl", "qwen2_5_vl", "clip")
model_code = (["visionzip_kernels.integrations.vllm."] + [f"vllm.model_executor.models.{n}" for n in names]
              + [f"transformers.models.{n}.modeling_" for n in names])
loaded = [m for m in sys.modules if m.startswith(tuple(model_code))]
assert not loaded, loaded
print("ok")
"""


def test_register_is_idempotent_and_lazy():
    """Registering (through vLLM's plugin loader, then again) names the four architectures and imports
    neither the plugin's model modules nor vLLM's or transformers' code of those models."""
    out = subprocess.run([sys.executable, "-c", REGISTER], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_hf_overrides():
    assert hf_overrides("Qwen2VLForConditionalGeneration", 64) == {
        "architectures": ["VisionZipQwen2VLForConditionalGeneration"], "visionzip_budget": 64}
    assert hf_overrides("LlavaNextForConditionalGeneration", 32, 4, layout="per_crop") == {
        "architectures": ["VisionZipLlavaNextForConditionalGeneration"], "visionzip_budget": 32,
        "visionzip_contextual": 4, "visionzip_layout": "per_crop"}
    assert sorted(ARCHITECTURES) == sorted(["LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                                            "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_position_channels_are_exact(dtype):
    """The grid coordinates ride in the embedding dtype: exact in bfloat16 up to 65535 a side."""
    coords = torch.tensor([[0, 0, 1, 7], [0, 255, 256, 65535], [3, 257, 40000, 65535]])
    rows = torch.randn(4, 16).to(dtype)
    packed = attach_positions(rows, coords)
    assert packed.shape == (4, 16 + POSITION_CHANNELS) and packed.dtype == dtype
    back, got = detach_positions(packed, 16)
    assert torch.equal(back, rows) and torch.equal(got, coords)
    video, zeros = detach_positions(rows, 16)  # rows without channels (videos): zero offsets
    assert video is rows and torch.equal(zeros, torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="expected 16 or 22"):
        detach_positions(torch.zeros(4, 19, dtype=dtype), 16)


def test_version_range():
    import vllm

    assert untested_vllm(vllm.__version__) is None  # the version CI runs
    assert untested_vllm("0.32.3") is None
    assert "outside the tested range >=0.32,<0.33" in untested_vllm("0.33.0")
    assert untested_vllm("0.31.2") is not None
