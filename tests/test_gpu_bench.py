"""The CPU-checkable parts of the GPU benchmark (benchmarks/gpu_bench.py, gpu_check.sh)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ilf_runtime import ILFConfig, apply_ilf
from ilf_runtime.ext import has_ext

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gb():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("script", ["gpu_check.sh", "fetch_wheels.sh"])
def test_shell_scripts_parse(script):
    res = subprocess.run(
        ["bash", "-n", str(ROOT / "benchmarks" / script)], check=False, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr


def test_gpu_check_needs_outdir():
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], check=False, capture_output=True, text=True
    )
    assert res.returncode != 0 and "usage: bash benchmarks/gpu_check.sh OUTDIR" in res.stderr


def test_arguments(gb):
    a = gb.parse_args(["--out", "x"])
    assert (a.device, a.dtype, a.reps, a.warmup, a.tiny) == ("cuda", "fp16", 5, 1, False)
    with pytest.raises(SystemExit):
        gb.parse_args(["--out", "x", "--reps", "0"])
    with pytest.raises(SystemExit, match="unknown --only cases"):
        gb.main(["--out", "x", "--device", "cpu", "--tiny", "--only", "nope"])


def test_real_sizes_are_the_published_models(gb):
    """Built on the meta device: DiT-XL/2 (675 M parameters in the paper; 750 M in diffusers, whose
    blocks each hold their own timestep and label embedders) and PixArt-Sigma (611 M)."""
    got = {}
    for case in gb.cases(tiny=False):
        model = gb.build(case, torch.device("meta"), torch.float16)
        got[case.name] = sum(p.numel() for p in model.parameters()) / 1e6
        assert len(model.transformer_blocks) == 28 and model.inner_dim == 1152
    assert set(got) == {"dit-xl2-256-b1", "dit-xl2-256-b8", "pixart-sigma-512-b1", "pixart-sigma-1024-b1"}
    assert abs(got["dit-xl2-256-b1"] - 749.8) < 1 and abs(got["pixart-sigma-1024-b1"] - 611.0) < 2, got
    cfg = ILFConfig(**gb.ILF_LOOP)
    assert cfg.block_evals(28, 10) == 332  # the paper's PixArt ILF cost: 10 x 28 + 4 x (12 + 1)
    assert ILFConfig(**gb.ILF_LOOP, loop_iters=1).block_evals(28, 20, "none") == 560  # 20 plain steps


def test_block_evals_are_counted(gb):
    """The block evaluations the report states for rows a-e are what actually runs: counted with
    `BlockEvalCounter` on the tiny cases (the same code path as the real sizes)."""
    from ilf_runtime.caches import BlockEvalCounter

    for case in gb.cases(tiny=True):
        layers = case.config["num_layers"]
        model = gb.build(case, torch.device("cpu"), torch.float32)
        with BlockEvalCounter(model) as plain:
            gb.runtime_loop(case, model, 20, None, False)()
        assert plain.count == 20 * layers, case.name
        cfg = ILFConfig(**gb.ILF_LOOP_TINY)
        apply_ilf(model, cfg)
        with BlockEvalCounter(model) as looped:
            gb.runtime_loop(case, model, 10, cfg.step_mask(10), False)()
        assert looped.count == cfg.block_evals(layers, 10) == 10 * layers + 2 * 3, case.name


def test_smoke_tiny_cpu(gb, tmp_path):
    res = gb.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--reps",
            "1",
            "--warmup",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("gpu_bench_") and {f[-3:] for f in files} == {".md", "son"}
    data = json.loads((tmp_path / files[0]).read_text())
    assert data["context"]["torch"] == torch.__version__ and data["context"]["diffusers"] == "0.42.1"
    for case in res["cases"]:
        assert list(case["rows"]) == ["a", "b", "c", "e"]  # no CUDA graph row on the CPU
        assert (
            case["rows"]["e"]["steps"] == 10
            and case["rows"]["e"]["block_evals"] < case["rows"]["a"]["block_evals"]
        )
        assert case["checks"]["c_vs_b_max_abs"] < 1e-2  # fused == unfused up to fp32 rounding over 20 steps
    assert "skipped" in res["kernels"]
    md = (tmp_path / files[1]).read_text()
    assert "| dit-tiny-b2 | e | 10 |" in md


@pytest.mark.skipif(not has_ext(), reason="ilf_runtime._C not loaded")
@pytest.mark.parametrize(
    "op", ["ada_layernorm", "ada_layernorm_table", "gated_residual", "gated_inject", "feedback_inject"]
)
def test_kernel_cases_compare_like_with_like(gb, op):
    """The kernel table's ext and reference calls compute the same thing (checked with the CPU kernels)."""
    ext, ref, args, nbytes = gb.kernel_args(op, (2, 4, 16), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(ext(*args), ref(*args), rtol=1e-5, atol=1e-5)
    assert nbytes >= 2 * args[0].numel() * 4
