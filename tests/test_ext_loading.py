"""Soft loading of ilf_runtime._C: the package imports and computes without it, and says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ilf_runtime.ext import ext_status, has_ext

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter; prints a JSON summary of what loaded and which path the ops took.
PROBE = """
import json, sys
import torch
import ilf_runtime
from ilf_runtime import ops
from ilf_runtime.ext import ext_status, has_ext

g = torch.Generator().manual_seed(0)
h, f = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
s = torch.tensor(0.5)
x, m = torch.randn(2, 3, 8, generator=g), torch.randn(2, 8, generator=g)
print(json.dumps({
    "status": ilf_runtime.ext_status(),
    "has_ext": has_ext(),
    "op_registered": hasattr(torch.ops.ilf, "feedback_inject"),
    "use_ext": ops._use_ext("feedback_inject", h, f, s),
    "inject_diff": (ops.feedback_inject(h, f, s) - ops.feedback_inject_ref(h, f, s)).abs().max().item(),
    "ada_diff": (ops.ada_layernorm(x, m, m, 1e-6) - ops.ada_layernorm_ref(x, m, m, 1e-6)).abs().max().item(),
    "cuda_initialized": torch.cuda.is_initialized(),
}))
"""

# Makes `import ilf_runtime._C` fail as it would without a built extension.
BLOCK_C = """
import importlib.abc, sys

class _BlockC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ilf_runtime._C":
            raise ImportError("blocked by test: no compiled extension")
        return None

sys.meta_path.insert(0, _BlockC())
"""


def _probe(prelude: str = "", **env: str) -> dict:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    code = textwrap.dedent(prelude) + PROBE
    res = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_status_shape():
    st = ext_status()
    assert set(st) == {"loaded", "reason", "path", "cuda_ops", "disabled_by_env"}
    assert st["loaded"] == has_ext()
    assert (st["reason"] is None) == st["loaded"]


def test_disabled_by_env_uses_references():
    out = _probe(ILF_DISABLE_EXT="1")
    st = out["status"]
    assert st["disabled_by_env"] and not st["loaded"] and not out["has_ext"]
    assert "ILF_DISABLE_EXT" in st["reason"]
    assert not out["op_registered"] and not out["use_ext"]
    assert out["inject_diff"] == 0 and out["ada_diff"] == 0
    assert not out["cuda_initialized"]


def test_missing_extension_is_reported():
    out = _probe(BLOCK_C, ILF_DISABLE_EXT="0")
    st = out["status"]
    assert not st["loaded"] and not st["disabled_by_env"] and st["path"] is None
    assert st["reason"] == "ImportError: blocked by test: no compiled extension"
    assert not out["op_registered"] and out["inject_diff"] == 0 and out["ada_diff"] == 0
    assert not out["cuda_initialized"]


@pytest.mark.skipif(not has_ext(), reason=f"ilf_runtime._C not loaded ({ext_status()['reason']})")
def test_loaded_extension_in_fresh_process():
    out = _probe(ILF_DISABLE_EXT="0")
    st = out["status"]
    assert st["loaded"] and st["reason"] is None and not st["disabled_by_env"]
    assert Path(st["path"]).name.startswith("_C.") and Path(st["path"]).parent.name == "ilf_runtime"
    assert out["op_registered"] and out["inject_diff"] < 1e-5 and out["ada_diff"] < 1e-5
    assert not out["cuda_initialized"]


def test_an_out_of_date_extension_is_named(monkeypatch):
    from ilf_runtime import ext

    monkeypatch.setitem(ext.EXPECTED_OPS, "no_such_op", 1)
    monkeypatch.setitem(ext.EXPECTED_OPS, "feedback_inject", 99)
    stale = ext.stale_ops()
    assert "no_such_op (missing)" in stale
    if ext.has_ext():
        assert "feedback_inject (3 arguments, expected 99)" in stale
