"""The Python examples of the README and of docs/*.md run as written (those that need a downloaded
checkpoint say so with "# not run in tests" and are skipped; those that need vLLM say "# needs vLLM"
and run in tests/vllm/test_docs.py)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (doc.relative_to(ROOT).as_posix(), i, code)
    for doc in DOCS
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S))
]


def test_readme_has_examples():
    assert any(name == "README.md" for name, _, _ in BLOCKS)


@pytest.mark.parametrize("name,index,code", BLOCKS, ids=[f"{n}[{i}]" for n, i, _ in BLOCKS])
def test_example_runs(name, index, code):
    if "# not run in tests" in code:
        pytest.skip("example needs a downloaded checkpoint")
    if "# needs vLLM" in code:
        pytest.skip("example needs vLLM: run by tests/vllm/test_docs.py")
    exec(compile(code, f"{name}[python block {index}]", "exec"), {"__name__": "__readme__"})
