"""Builds the extension ilf_runtime._C; project metadata lives in pyproject.toml.

Build switches (environment):
    ILF_SKIP_EXT_BUILD=1   build no extension: a pure-Python install that uses the references.
    ILF_CUDA_BUILD=auto    (default) add the CUDA kernels when torch is a CUDA build and the CUDA
                           toolkit is found (CUDA_HOME); 1 requires them, 0 builds the CPU kernels only.
    TORCH_CUDA_ARCH_LIST   GPU architectures of the CUDA kernels, default "8.0;9.0".
    MAX_JOBS               parallel compile jobs (torch.utils.cpp_extension).

The sources are listed once, in csrc/sources.txt, which cmake/ reads as well.
"""

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def read_sources(section: str) -> list[str]:
    """Paths (relative to the repository root) listed under ``[section]`` in csrc/sources.txt."""
    current, out = None, {}
    for raw in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            out.setdefault(current, [])
        elif line:
            out[current].append(line)
    return out.get(section, [])


def _env_flag(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower()
    if value not in allowed:
        raise SystemExit(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup()."""
    if _env_flag("ILF_SKIP_EXT_BUILD", "0", ("0", "1")) == "1":
        return [], {}
    mode = _env_flag("ILF_CUDA_BUILD", "auto", ("0", "1", "auto"))

    import torch
    from torch.utils import cpp_extension as ce

    cuda_torch = torch.version.cuda is not None
    if mode == "1" and not cuda_torch:
        raise SystemExit(
            f"ILF_CUDA_BUILD=1 needs a CUDA build of torch, but torch {torch.__version__} is CPU-only "
            "(torch.version.cuda is None). Install a CUDA torch, or set ILF_CUDA_BUILD=0 or auto."
        )
    toolkit = ce.CUDA_HOME is not None and (Path(ce.CUDA_HOME) / "include" / "cuda_runtime.h").is_file()
    if mode == "1" and not toolkit:
        raise SystemExit(
            f"ILF_CUDA_BUILD=1 but no CUDA toolkit was found (CUDA_HOME={ce.CUDA_HOME!r}). "
            "Set CUDA_HOME to the toolkit root (the directory holding bin/nvcc and include/)."
        )
    with_cuda = mode == "1" or (mode == "auto" and cuda_torch and toolkit)
    if mode == "auto" and cuda_torch and not toolkit:
        print(
            f"ilf_runtime: CUDA torch but no CUDA toolkit at CUDA_HOME={ce.CUDA_HOME!r}; building the CPU "
            "kernels only (set CUDA_HOME to the toolkit root, or ILF_CUDA_BUILD=1 to make this an error)",
            file=sys.stderr,
        )

    cxx_flags = ["-O3", "-fopenmp"]  # at::parallel_for runs serially without OpenMP
    kwargs = {
        "name": "ilf_runtime._C",
        "sources": read_sources("cpu"),
        "include_dirs": [str(ROOT / "csrc")],
        "extra_compile_args": {"cxx": cxx_flags},
        "extra_link_args": ["-fopenmp"],
    }
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        kwargs["sources"] += read_sources("cuda_kernels") + read_sources("cuda_bindings")
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo"]
        kwargs["define_macros"] = [("ILF_WITH_CUDA", "1")]
        ext = ce.CUDAExtension(**kwargs)
    else:
        ext = ce.CppExtension(**kwargs)
    return [ext], {"build_ext": ce.BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
