"""The README's Public API example runs as written, on the bundled model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block(after: str) -> str:
    text = README.read_text()
    section = text[text.index(after) :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_public_api_example_runs(tmp_path, monkeypatch):
    from ilf_runtime.registry import MODEL_NAMES

    if not (MODEL_NAMES["fashion-dit"][0] / "feedback.safetensors").is_file():
        pytest.skip("the bundled model's shipped weights are not in this checkout")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_python_block("## Public API"), "README.md", "exec"), scope)  # noqa: S102 - the point of the test
    ilf = scope["ilf"]
    assert tuple(scope["out"].images.shape) == (2, 1, 16, 16)
    assert (tmp_path / "fb.safetensors").is_file()
    assert ilf.get_ilf(scope["model"]) is scope["loop"]
    assert scope["loop"].config.loop_start == 3


def test_every_python_block_runs(tmp_path, monkeypatch):
    """Each ```python block of the README, run as written (on the bundled models), in order."""
    from ilf_runtime.registry import MODEL_NAMES

    if not (MODEL_NAMES["fashion-dit"][0] / "feedback.safetensors").is_file():
        pytest.skip("the bundled model's shipped weights are not in this checkout")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i}", "exec"), {})  # noqa: S102 - the point of the test
    assert (tmp_path / "sneaker.png").is_file()
