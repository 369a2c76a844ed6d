"""The wheel holds the package and its assets, nothing else: no tests, fixtures or build debris, and
the README as its long description."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout"
)
def test_wheel_contents(tmp_path):
    src = tmp_path / "src"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(src)], check=True)  # committed files only
    env = os.environ | {"ILF_SKIP_EXT_BUILD": "1"}  # the package files; the extension is built elsewhere
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(tmp_path),
        ".",
    ]
    r = subprocess.run(cmd, check=False, cwd=src, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = tmp_path.glob("ilf_runtime-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"ilf_runtime", f"{whl.name.split('-')[0]}-{whl.name.split('-')[1]}.dist-info"}
    bad = [
        n for n in names if n.endswith((".o", ".so.tmp", ".pyc", ".tmp")) or "/tests/" in n or "fixtures" in n
    ]
    assert not bad
    assert "ilf_runtime/assets/fashion-dit/config.json" in names
    if (ROOT / "ilf_runtime/assets/fashion-t2i").is_dir():  # its prompt files travel with it
        assert {
            "ilf_runtime/assets/fashion-t2i/train_prompts.txt",
            "ilf_runtime/assets/fashion-t2i/val_prompts.txt",
        } <= set(names)
    meta = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Description-Content-Type: text/markdown" in meta and "# ilf-runtime" in meta
