"""Compile check of the torch-free CUDA kernels with bare nvcc (about a second each, no GPU).

The files listed under [cuda_kernels] in csrc/sources.txt must not include torch headers, so
that this check runs on every machine with the CUDA toolkit, even with a CPU-only torch.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
ARCH = "-gencode=arch=compute_90,code=sm_90"
# What torch.utils.cpp_extension adds to every nvcc command of a CUDAExtension.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


def kernel_sources() -> list[str]:
    section, out = None, []
    for raw in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif line and section == "cuda_kernels":
            out.append(line)
    return out


SOURCES = kernel_sources()


def test_kernel_list_is_not_empty():
    assert SOURCES and all(s.endswith(".cu") for s in SOURCES)


@pytest.mark.parametrize("src", SOURCES)
def test_kernels_include_no_torch_headers(src):
    """Follows local includes: none of them may reach torch, ATen or c10."""
    seen, todo = set(), [ROOT / src]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for inc in re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', path.read_text(), re.MULTILINE):
            assert not inc.startswith(("torch/", "ATen/", "c10/", "pybind11/")), f"{path.name} includes {inc}"
            local = path.parent / inc
            if local.is_file():
                todo.append(local)


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("torch_flags", [False, True], ids=["bare", "torch-flags"])
@pytest.mark.parametrize("src", SOURCES)
def test_nvcc_compiles(src, torch_flags, tmp_path):
    cmd = [NVCC, "-O3", ARCH, "-c", str(ROOT / src), "-o", str(tmp_path / "k.o")]
    if torch_flags:
        cmd[1:1] = TORCH_NVCC_FLAGS
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr.lower(), res.stderr
