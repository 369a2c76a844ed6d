"""The compiled ``torch.ops.ilf`` kernels against their PyTorch references (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import IlfOpCalls, require_cuda_kernels

from ilf_runtime import ops
from ilf_runtime.ext import ext_status, has_ext

needs_ext = pytest.mark.skipif(
    not has_ext(),
    reason=f"ilf_runtime._C not loaded ({ext_status()['reason']}); build it with "
    "`pip install --no-build-isolation -e .`",
)

# (B, T, D): tiny; D not a multiple of 16 (vector tails); more than one parallel task.
SHAPES = [(2, 5, 16), (3, 7, 72), (4, 64, 160)]
EPS = 1e-6


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _inject_inputs(shape, s_kind: str, dtype=torch.float32, s_dtype=None, seed=0):
    b, t, d = shape
    h = _randn(b, t, d, seed=seed, dtype=dtype)
    f = _randn(b, t, d, seed=seed + 1, dtype=dtype)
    s_shape = () if s_kind == "scalar" else (d,)
    s = (0.5 * _randn(*s_shape, seed=seed + 2)).to(s_dtype or dtype)
    return h, f, s


def _ada_inputs(shape, mod_kind: str, dtype=torch.float32, seed=0):
    b, t, d = shape
    x = 2.0 + 3.0 * _randn(b, t, d, seed=seed, dtype=torch.float32)  # mean and variance far from 0, 1
    mod_shape = (b, d) if mod_kind == "BD" else (b, 1, d)
    shift = _randn(*mod_shape, seed=seed + 1)
    scale = 0.3 * _randn(*mod_shape, seed=seed + 2)
    return x.to(dtype), shift.to(dtype), scale.to(dtype)


def _table_inputs(shape, dtype=torch.float32, seed=10):
    """PixArt's adaLN-single: (B, 1, D) chunks of a per-sample embedding plus (D,) table rows."""
    b, t, d = shape
    x = (1.0 + 2.0 * _randn(b, t, d, seed=seed)).to(dtype)
    temb = _randn(b, 6, d, seed=seed + 1).to(dtype)  # the t-embedding as PixArt reshapes it
    table = (_randn(6, d, seed=seed + 2) / d**0.5).to(dtype)  # scale_shift_table
    return x, temb, table


def _gated_inputs(shape, mode: str, dtype=torch.float32, seed=20):
    """(x, gate, y, gate_table, f, s) for gated_residual; mode in plain, table, scalar, channel."""
    b, t, d = shape
    x, y = _randn(b, t, d, seed=seed, dtype=dtype), _randn(b, t, d, seed=seed + 1, dtype=dtype)
    gate = (0.7 * _randn(b, d, seed=seed + 2)).to(dtype)
    table = (0.2 * _randn(d, seed=seed + 3)).to(dtype) if mode == "table" else None
    f = s = None
    if mode in ("scalar", "channel"):
        f = _randn(b, t, d, seed=seed + 4, dtype=dtype)
        s = (0.5 * _randn(*(() if mode == "scalar" else (d,)), seed=seed + 5)).to(dtype)
    return x, gate, y, table, f, s


GATED_MODES = ["plain", "table", "scalar", "channel"]


def _max_err(out: torch.Tensor, ref64: torch.Tensor) -> float:
    return (out.double() - ref64).abs().max().item()


# ---------------------------------------------------------------------------------------------
# References (always run)


@pytest.mark.parametrize("s_kind", ["scalar", "channel"])
def test_feedback_inject_ref_matches_formula(s_kind):
    h, f, s = _inject_inputs((2, 3, 8), s_kind, dtype=torch.float64)
    torch.testing.assert_close(ops.feedback_inject_ref(h, f, s), h + s * f, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mod_kind", ["BD", "B1D"])
def test_ada_layernorm_ref_matches_formula(mod_kind):
    x, shift, scale = _ada_inputs((2, 3, 8), mod_kind, dtype=torch.float64)
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    want = (x - mean) / torch.sqrt(var + EPS) * (1 + scale.reshape(2, 1, 8)) + shift.reshape(2, 1, 8)
    torch.testing.assert_close(ops.ada_layernorm_ref(x, shift, scale, EPS), want, rtol=1e-10, atol=1e-10)


def test_ada_layernorm_ref_tables_match_pixart_formula():
    """The table form is PixArt's adaLN-single as BasicTransformerBlock computes it."""
    x, temb, table = _table_inputs((2, 3, 8), dtype=torch.float64)
    mod = table[None] + temb  # (B, 6, D)
    shift, scale = mod[:, 0:1], mod[:, 1:2]  # (B, 1, D)
    want = F.layer_norm(x, (8,), eps=EPS) * (1 + scale) + shift
    got = ops.ada_layernorm_ref(x, temb[:, 0], temb[:, 1], EPS, table[0], table[1])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", GATED_MODES)
def test_gated_residual_ref_matches_formula(mode):
    x, gate, y, table, f, s = _gated_inputs((2, 3, 8), mode, dtype=torch.float64)
    g = gate[:, None] + (0 if table is None else table)
    want = x + g * y + (0 if f is None else s * f)
    torch.testing.assert_close(ops.gated_residual_ref(x, gate, y, table, f, s), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_residual_ref_rounds_like_unfused_ops(dtype):
    x, gate, y, _, f, s = _gated_inputs((2, 5, 16), "channel", dtype=dtype)
    fused = ops.gated_residual_ref(x, gate, y, None, f, s)
    unfused = ops.feedback_inject_ref(ops.gated_residual_ref(x, gate, y), f, s)
    assert torch.equal(fused, unfused)


def test_public_ops_under_autograd_use_reference():
    h, f, s = _inject_inputs((2, 3, 8), "channel")
    s.requires_grad_(True)
    assert not ops._use_ext("feedback_inject", h, f, s)
    ops.feedback_inject(h, f, s).sum().backward()
    torch.testing.assert_close(s.grad, f.sum((0, 1)))
    x, shift, scale = _ada_inputs((2, 3, 8), "BD")
    x.requires_grad_(True)
    ops.ada_layernorm(x, shift, scale, EPS).sum().backward()
    assert x.grad is not None


def test_dispatch_follows_prefer_table(monkeypatch):
    h, f, s = _inject_inputs((2, 3, 8), "scalar")
    for prefer in (True, False):
        monkeypatch.setitem(ops._PREFER_EXT, ("feedback_inject", "cpu", torch.float32), prefer)
        assert ops._use_ext("feedback_inject", h, f, s) == (prefer and has_ext())
    h64, f64, s64 = _inject_inputs((2, 3, 8), "scalar", dtype=torch.float64)
    assert not ops._use_ext("feedback_inject", h64, f64, s64)  # no kernel for float64
    with torch.device("meta"):
        assert not ops._use_ext(
            "feedback_inject", torch.empty(2, 3, 8), torch.empty(2, 3, 8), torch.empty(())
        )


# ---------------------------------------------------------------------------------------------
# Kernels against references


@needs_ext
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("s_kind", ["scalar", "channel"])
def test_feedback_inject_fp32(shape, s_kind):
    h, f, s = _inject_inputs(shape, s_kind)
    out = torch.ops.ilf.feedback_inject(h, f, s)
    torch.testing.assert_close(out, ops.feedback_inject_ref(h, f, s), rtol=1e-5, atol=1e-6)
    assert out.dtype == h.dtype and out.is_contiguous()


@needs_ext
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mod_kind", ["BD", "B1D"])
def test_ada_layernorm_fp32(shape, mod_kind):
    x, shift, scale = _ada_inputs(shape, mod_kind)
    out = torch.ops.ilf.ada_layernorm(x, shift, scale, EPS)
    torch.testing.assert_close(out, ops.ada_layernorm_ref(x, shift, scale, EPS), rtol=1e-5, atol=1e-5)
    assert out.dtype == x.dtype and out.is_contiguous()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("s_kind", ["scalar", "channel"])
def test_feedback_inject_low_precision(dtype, shape, s_kind):
    """Error against fp64 at most twice that of the eager reference in the same dtype."""
    h, f, s = _inject_inputs(shape, s_kind, dtype=dtype)
    ref64 = ops.feedback_inject_ref(h.double(), f.double(), s.double())
    out = torch.ops.ilf.feedback_inject(h, f, s)
    assert out.dtype == dtype
    assert _max_err(out, ref64) <= 2 * _max_err(ops.feedback_inject_ref(h, f, s), ref64) + 1e-6


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mod_kind", ["BD", "B1D"])
def test_ada_layernorm_low_precision(dtype, shape, mod_kind):
    x, shift, scale = _ada_inputs(shape, mod_kind, dtype=dtype)
    ref64 = ops.ada_layernorm_ref(x.double(), shift.double(), scale.double(), EPS)
    out = torch.ops.ilf.ada_layernorm(x, shift, scale, EPS)
    assert out.dtype == dtype
    assert _max_err(out, ref64) <= 2 * _max_err(ops.ada_layernorm_ref(x, shift, scale, EPS), ref64) + 1e-6


@needs_ext
@pytest.mark.parametrize("s_dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_feedback_inject_scale_dtypes(s_dtype):
    h, f, s = _inject_inputs((2, 5, 24), "channel", s_dtype=s_dtype)
    torch.testing.assert_close(
        torch.ops.ilf.feedback_inject(h, f, s), ops.feedback_inject_ref(h, f, s), rtol=1e-5, atol=1e-6
    )


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feedback_inject_zero_scale_is_identity(dtype):
    h, f, _ = _inject_inputs((2, 5, 40), "scalar", dtype=dtype)
    assert torch.equal(torch.ops.ilf.feedback_inject(h, f, torch.zeros(())), h)
    assert torch.equal(torch.ops.ilf.feedback_inject(h, f, torch.zeros(40, dtype=dtype)), h)


@needs_ext
def test_non_contiguous_inputs():
    b, t, d = 3, 7, 40
    h = _randn(b, d, t, seed=0).transpose(1, 2)  # (B, T, D), strided
    f = _randn(b, t, 2 * d, seed=1)[..., ::2]
    s = _randn(2 * d, seed=2)[::2]
    assert not (h.is_contiguous() or f.is_contiguous() or s.is_contiguous())
    out = torch.ops.ilf.feedback_inject(h, f, s)
    torch.testing.assert_close(out, ops.feedback_inject_ref(h, f, s), rtol=1e-5, atol=1e-6)
    assert out.is_contiguous()

    x = _randn(b, d, t, seed=3).transpose(1, 2)
    shift, scale, *_ = _randn(b, 6 * d, seed=4).chunk(6, dim=1)  # as DiT splits its embedding
    out = torch.ops.ilf.ada_layernorm(x, shift, scale, EPS)
    torch.testing.assert_close(out, ops.ada_layernorm_ref(x, shift, scale, EPS), rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_ada_layernorm_tables(dtype, shape):
    x, temb, table = _table_inputs(shape, dtype)
    args = (x, temb[:, 3:4], temb[:, 4:5], EPS, table[3], table[4])  # strided (B, 1, D) chunks
    out = torch.ops.ilf.ada_layernorm(*args)
    ref = ops.ada_layernorm_ref(*args)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        ref64 = ops.ada_layernorm_ref(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
        assert _max_err(out, ref64) <= 2 * _max_err(ref, ref64) + 1e-6


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", GATED_MODES)
def test_gated_residual_kernel(dtype, shape, mode):
    args = _gated_inputs(shape, mode, dtype)
    out = torch.ops.ilf.gated_residual(*args)
    ref = ops.gated_residual_ref(*args)
    assert out.dtype == dtype and out.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    else:  # same roundings as the reference, so at most one ulp apart (fma vs mul + add)
        ref64 = ops.gated_residual_ref(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
        assert _max_err(out, ref64) <= 2 * _max_err(ref, ref64) + 1e-6


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_residual_zero_scale_is_plain_epilogue(dtype):
    x, gate, y, table, f, _ = _gated_inputs((2, 5, 40), "scalar", dtype)
    plain = torch.ops.ilf.gated_residual(x, gate, y, table)
    assert torch.equal(
        torch.ops.ilf.gated_residual(x, gate, y, table, f, torch.zeros((), dtype=dtype)), plain
    )
    assert torch.equal(torch.ops.ilf.gated_residual(x, gate, y, table, f, torch.zeros(40)), plain)


@needs_ext
def test_gated_residual_strided_mixed_dtypes():
    b, t, d = 3, 7, 40
    x = _randn(b, d, t, seed=0).transpose(1, 2)  # (B, T, D), strided
    y = _randn(b, t, 2 * d, seed=1)[..., ::2]
    gate, *_ = _randn(b, 6 * d, seed=2).chunk(6, dim=1)  # as DiT splits its embedding
    f = _randn(b, t, d, seed=3)
    s = _randn(d, seed=4, dtype=torch.float64)
    table = _randn(d, seed=5, dtype=torch.bfloat16)
    out = torch.ops.ilf.gated_residual(x, gate, y, table, f, s)
    torch.testing.assert_close(out, ops.gated_residual_ref(x, gate, y, table, f, s), rtol=1e-5, atol=1e-6)


@needs_ext
def test_empty_inputs():
    h = torch.empty(0, 3, 8)
    assert torch.ops.ilf.feedback_inject(h, h, torch.ones(())).shape == (0, 3, 8)
    assert torch.ops.ilf.ada_layernorm(h, torch.zeros(0, 8), torch.zeros(0, 8), EPS).shape == (0, 3, 8)
    assert torch.ops.ilf.gated_residual(h, torch.zeros(0, 8), h, None, h, torch.ones(())).shape == (0, 3, 8)


@needs_ext
def test_public_ops_agree_with_reference_either_way(monkeypatch):
    """The public ops run the compiled kernel exactly when preferred, and give the formula's value
    (computed here in float64, independently of the references) either way."""
    h, f, s = _inject_inputs((2, 5, 24), "channel")
    x, shift, scale = _ada_inputs((2, 5, 24), "B1D")
    g_args = _gated_inputs((2, 5, 24), "channel")
    xg, gate, yg, _, fg, sg = (t.double() if t is not None else None for t in g_args)
    want_gated = (xg + gate[:, None] * yg + sg * fg).float()
    want_inject = (h.double() + s.double() * f.double()).float()
    x64 = x.double()
    mean, var = x64.mean(-1, keepdim=True), x64.var(-1, unbiased=False, keepdim=True)
    want_ada = ((x64 - mean) / torch.sqrt(var + EPS) * (1 + scale.double()) + shift.double()).float()
    for prefer in (True, False):
        for key in [*ops._PREFER_EXT, ("gated_residual", "cpu", torch.float32)]:
            monkeypatch.setitem(ops._PREFER_EXT, key, prefer)
        with IlfOpCalls() as calls:
            got_gated = ops.gated_residual(*g_args)
            got_inject = ops.feedback_inject(h, f, s)
            got_ada = ops.ada_layernorm(x, shift, scale, EPS)
        want_calls = {"gated_residual": 1, "feedback_inject": 1, "ada_layernorm": 1} if prefer else {}
        assert dict(calls.counts) == want_calls, prefer
        torch.testing.assert_close(got_gated, want_gated, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_inject, want_inject, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_ada, want_ada, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Input checks: the kernels and the references reject bad input with the same message

_r = _randn
BAD_INPUTS = [
    ("feedback_inject", lambda: (_r(2, 3, 8, seed=0), _r(2, 3, 8, seed=1), _r(3, 4, seed=2)),
     r"ilf::feedback_inject: s must be 0-dim or shape \(D,\)=\(8,\), got \(3, 4\)"),
    ("feedback_inject", lambda: (_r(2, 3, 8, seed=0), _r(2, 3, 9, seed=1), _r(seed=2)),
     r"ilf::feedback_inject: f must have shape \(B, T, D\)=\(2, 3, 8\), got \(2, 3, 9\)"),
    ("feedback_inject", lambda: (_r(3, 8, seed=0), _r(3, 8, seed=1), _r(seed=2)),
     r"ilf::feedback_inject: h must have shape \(B, T, D\), got \(3, 8\)"),
    ("feedback_inject", lambda: (_r(2, 3, 8, seed=0), _r(2, 3, 8, seed=1, dtype=torch.bfloat16), _r(seed=2)),
     r"ilf::feedback_inject: f must have the dtype of h \(float32\), got bfloat16"),
    ("feedback_inject", lambda: (_r(2, 3, 8, seed=0), _r(2, 3, 8, seed=1), torch.ones((), dtype=torch.long)),
     r"ilf::feedback_inject: s must be a floating-point tensor, got int64"),
    ("ada_layernorm", lambda: (_r(3, 8, seed=0), _r(3, 8, seed=1), _r(3, 8, seed=2), EPS),
     r"ilf::ada_layernorm: x must have shape \(B, T, D\), got \(3, 8\)"),
    ("ada_layernorm", lambda: (_r(2, 3, 8, seed=0), _r(3, 8, seed=1), _r(2, 8, seed=2), EPS),
     r"ilf::ada_layernorm: shift must have shape \(B, D\)=\(2, 8\) or \(B, 1, D\)=\(2, 1, 8\), got \(3, 8\)"),
    ("ada_layernorm", lambda: (_r(2, 3, 8, seed=0), _r(2, 8, seed=1), _r(2, 2, 8, seed=2), EPS),
     r"ilf::ada_layernorm: scale must have shape \(B, D\)=\(2, 8\) or \(B, 1, D\)=\(2, 1, 8\), got \(2, 2, 8\)"),
    ("ada_layernorm", lambda: (_r(2, 3, 8, seed=0), _r(2, 8, seed=1), _r(2, 8, seed=2), -1.0),
     r"ilf::ada_layernorm: eps must be >= 0, got -1"),
    ("ada_layernorm", lambda: (_r(2, 3, 8, seed=0), _r(2, 8, seed=1), _r(2, 8, seed=2), EPS, _r(6, 8, seed=3)),
     r"ilf::ada_layernorm: shift_table must have shape \(D,\)=\(8,\), got \(6, 8\)"),
    ("gated_residual", lambda: (_r(2, 3, 8, seed=0), _r(2, 8, seed=1), _r(2, 3, 7, seed=2)),
     r"ilf::gated_residual: y must have shape \(B, T, D\)=\(2, 3, 8\), got \(2, 3, 7\)"),
    ("gated_residual", lambda: (_r(2, 3, 8, seed=0), _r(2, 3, 8, seed=1), _r(2, 3, 8, seed=2)),
     r"ilf::gated_residual: gate must have shape \(B, D\)=\(2, 8\) or \(B, 1, D\)=\(2, 1, 8\), got \(2, 3, 8\)"),
    ("gated_residual", lambda: (_r(2, 3, 8, seed=0), _r(2, 8, seed=1), _r(2, 3, 8, seed=2), None, _r(2, 3, 8, seed=3)),
     r"ilf::gated_residual: f and s must be given together"),
    ("gated_residual", lambda: (_r(2, 3, 8, seed=0), _r(2, 8, seed=1), _r(2, 3, 8, seed=2), None, _r(2, 3, 8, seed=3), _r(4, seed=4)),
     r"ilf::gated_residual: s must be 0-dim or shape \(D,\)=\(8,\), got \(4,\)"),
]  # fmt: skip


@pytest.mark.parametrize("impl", ["ext", "ref"])
@pytest.mark.parametrize("op,make,msg", BAD_INPUTS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_INPUTS)])
def test_bad_inputs_named_errors(impl, op, make, msg):
    if impl == "ext" and not has_ext():
        pytest.skip("ilf_runtime._C not loaded")
    fn = getattr(torch.ops.ilf, op) if impl == "ext" else getattr(ops, f"{op}_ref")
    with pytest.raises(RuntimeError if impl == "ext" else ValueError, match=msg):
        fn(*make())


@needs_ext
def test_kernel_rejects_float64_with_named_error():
    h = torch.zeros(1, 2, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"h must be float32, bfloat16 or float16, got float64"):
        torch.ops.ilf.feedback_inject(h, h, torch.ones(()))


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    for s_kind in ("scalar", "channel"):
        torch.library.opcheck(
            torch.ops.ilf.feedback_inject.default, _inject_inputs((2, 5, 24), s_kind, dtype), test_utils=tests
        )
    for mod_kind in ("BD", "B1D"):
        args = (*_ada_inputs((2, 5, 24), mod_kind, dtype), EPS)
        torch.library.opcheck(torch.ops.ilf.ada_layernorm.default, args, test_utils=tests)
    x, temb, table = _table_inputs((2, 5, 24), dtype)
    args = (x, temb[:, 0], temb[:, 1], EPS, table[0], table[1])
    torch.library.opcheck(torch.ops.ilf.ada_layernorm.default, args, test_utils=tests)
    for mode in GATED_MODES:
        args = _gated_inputs((2, 5, 24), mode, dtype)
        torch.library.opcheck(torch.ops.ilf.gated_residual.default, args, test_utils=tests)


@needs_ext
def test_meta_and_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    out = torch.ops.ilf.feedback_inject(*(t.to("meta") for t in _inject_inputs((2, 5, 24), "channel")))
    assert out.device.type == "meta" and out.shape == (2, 5, 24)
    with FakeTensorMode():
        x = torch.empty(4, 6, 32, dtype=torch.bfloat16)
        out = torch.ops.ilf.ada_layernorm(x, torch.empty(4, 32), torch.empty(4, 1, 32), EPS)
        assert out.shape == x.shape and out.dtype == x.dtype
        with pytest.raises(ValueError, match=r"shift must have shape \(B, D\)=\(4, 32\)"):
            torch.ops.ilf.ada_layernorm(x, torch.empty(3, 32), torch.empty(4, 32), EPS)


# ---------------------------------------------------------------------------------------------
# CUDA kernels (marked; skipped without a GPU; CUDA is only touched inside the tests)


def _cuda_ops_or_skip() -> None:
    require_cuda_kernels()


def _check_against_ref(out, ref_fn, args, dtype):
    ref = ref_fn(*args)
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ref64 = ref_fn(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
    assert _max_err(out, ref64) <= 2 * _max_err(ref, ref64) + 1e-6


# D = 13: unaligned rows (one element per access); 9000: rows too long for the shared-memory cache.
CUDA_SHAPES = [(2, 5, 16), (3, 7, 72), (2, 3, 13), (4, 64, 1152), (2, 3, 9000)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("s_kind", ["scalar", "channel"])
@pytest.mark.parametrize("s_fp32", [False, True])
def test_cuda_feedback_inject(dtype, shape, s_kind, s_fp32):
    _cuda_ops_or_skip()
    h, f, s = (t.cuda() for t in _inject_inputs(shape, s_kind, dtype, torch.float32 if s_fp32 else None))
    _check_against_ref(torch.ops.ilf.feedback_inject(h, f, s), ops.feedback_inject_ref, (h, f, s), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("mod_kind", ["BD", "B1D"])
def test_cuda_ada_layernorm(dtype, shape, mod_kind):
    _cuda_ops_or_skip()
    x, shift, scale = (t.cuda() for t in _ada_inputs(shape, mod_kind, dtype))
    args = (x, shift, scale, EPS)
    _check_against_ref(torch.ops.ilf.ada_layernorm(*args), ops.ada_layernorm_ref, args, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_ada_layernorm_tables(dtype, shape):
    _cuda_ops_or_skip()
    x, temb, table = (t.cuda() for t in _table_inputs(shape, dtype))
    args = (x, temb[:, 0:1], temb[:, 1:2], EPS, table[0], table[1])  # PixArt's strided chunks
    _check_against_ref(torch.ops.ilf.ada_layernorm(*args), ops.ada_layernorm_ref, args, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("mode", GATED_MODES)
def test_cuda_gated_residual(dtype, shape, mode):
    _cuda_ops_or_skip()
    args = tuple(None if t is None else t.cuda() for t in _gated_inputs(shape, mode, dtype))
    _check_against_ref(torch.ops.ilf.gated_residual(*args), ops.gated_residual_ref, args, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_gated_residual_misaligned_and_mixed(dtype):
    _cuda_ops_or_skip()
    b, t, d = 3, 7, 64
    x = _randn(b * t * d + 1, seed=0, dtype=dtype).cuda()[1:].view(b, t, d)  # not 16-byte aligned
    y = _randn(b, t, d, seed=1, dtype=dtype).cuda()
    gate, *_ = _randn(b, 6 * d, seed=2, dtype=dtype).cuda().chunk(6, dim=1)  # row stride 6 * D
    f = _randn(b, t, d, seed=3, dtype=dtype).cuda()
    args = (x, gate, y, _randn(d, seed=4).cuda(), f, _randn(seed=5).cuda())  # fp32 table and s
    _check_against_ref(torch.ops.ilf.gated_residual(*args), ops.gated_residual_ref, args, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_strided_and_misaligned(dtype):
    _cuda_ops_or_skip()
    b, t, d = 3, 7, 64
    h = _randn(b * t * d + 1, seed=0, dtype=dtype).cuda()[1:].view(b, t, d)  # not 16-byte aligned
    f = _randn(b, d, t, seed=1, dtype=dtype).cuda().transpose(1, 2)
    s = _randn(2 * d, seed=2, dtype=dtype).cuda()[::2]
    _check_against_ref(torch.ops.ilf.feedback_inject(h, f, s), ops.feedback_inject_ref, (h, f, s), dtype)
    shift, scale, *_ = _randn(b, 6 * d, seed=3, dtype=dtype).cuda().chunk(6, dim=1)  # row stride 6 * D
    args = (h, shift, scale.float(), EPS)  # mixed modulation dtypes are read in fp32
    _check_against_ref(torch.ops.ilf.ada_layernorm(*args), ops.ada_layernorm_ref, args, dtype)


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager():
    _cuda_ops_or_skip()
    h, f, s = (t.cuda() for t in _inject_inputs((4, 64, 256), "channel", torch.bfloat16))
    _, shift, scale = (t.cuda() for t in _ada_inputs((4, 64, 256), "BD", torch.bfloat16))

    def run():
        return torch.ops.ilf.ada_layernorm(torch.ops.ilf.feedback_inject(h, f, s), shift, scale, EPS)

    want = run()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.clone(), want, rtol=0, atol=0)
