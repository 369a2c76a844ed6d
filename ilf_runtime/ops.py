"""The ILF kernels: pure-PyTorch references and dispatch to the compiled ``torch.ops.ilf`` ops.

Each op has a reference with the same signature (``<name>_ref``), which is both the fallback and
the test oracle, and a public function that calls the compiled op only when

- the extension loaded and has a kernel for the input's device,
- no input needs a gradient (the compiled ops have no backward), and
- the compiled op was measured to beat the reference on that device and dtype (`_PREFER_EXT`);

otherwise it calls the reference. Both paths validate their inputs with the same messages.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ilf_runtime.ext import ext_status

logger = logging.getLogger(__name__)

__all__ = [
    "ada_layernorm",
    "ada_layernorm_ref",
    "feedback_inject",
    "feedback_inject_ref",
    "gated_residual",
    "gated_residual_ref",
]

# Whether the compiled op beats the eager reference, per (op, device type, dtype), from
# benchmarks/results/cpu_ops.md (2 threads, AVX-512 CPU, four sizes): fp32 feedback_inject is no
# faster (geometric-mean speed-up ~1.0x; the reference is one addcmul pass), every other kernel is
# at least 1.7x faster at every size. Rerun benchmarks/cpu_ops.py to refresh. Missing entries mean "use the
# reference": float16 and gated_residual on the CPU (not benchmarked).
# CUDA entries are set by design, not yet by measurement: each kernel makes one pass over memory where
# the eager reference makes three to five (casts, layer_norm, modulation, residual, injection) and
# launches as many kernels. benchmarks/gpu_bench.py times every kernel against its reference
# ("kernels" table in its report); revise these entries from that table.
_PREFER_EXT: dict[tuple[str, str, torch.dtype], bool] = {
    ("feedback_inject", "cpu", torch.float32): False,  # fp32 addcmul is already one pass
    ("feedback_inject", "cpu", torch.bfloat16): True,
    ("ada_layernorm", "cpu", torch.float32): True,
    ("ada_layernorm", "cpu", torch.bfloat16): True,
    **{
        (op, "cuda", dt): True
        for op in ("feedback_inject", "ada_layernorm", "gated_residual")
        for dt in (torch.float32, torch.bfloat16, torch.float16)
    },
}

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _ext_devices() -> frozenset[str]:
    st = ext_status()
    if not st["loaded"]:
        return frozenset()
    return frozenset({"cpu", "cuda"} if st["cuda_ops"] else {"cpu"})


_EXT_DEVICES = _ext_devices()


def _use_ext(op: str, *tensors: torch.Tensor) -> bool:
    """Whether `op` on these inputs should run the compiled kernel rather than the reference."""
    t = tensors[0]
    if t.device.type not in _EXT_DEVICES:
        return False
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return False
    return _PREFER_EXT.get((op, t.device.type, t.dtype), False)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _check(ok: bool, op: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"ilf::{op}: {msg}")


def _check_feedback_inject(h: torch.Tensor, f: torch.Tensor, s: torch.Tensor, kernel: bool = False) -> None:
    op = "feedback_inject"
    _check(h.dim() == 3, op, f"h must have shape (B, T, D), got {tuple(h.shape)}")
    _check(f.shape == h.shape, op, f"f must have shape (B, T, D)={tuple(h.shape)}, got {tuple(f.shape)}")
    if kernel:
        _check(h.dtype in _KERNEL_DTYPES, op, f"h must be float32, bfloat16 or float16, got {_dtype(h)}")
    _check(h.dtype.is_floating_point, op, f"h must be a floating-point tensor, got {_dtype(h)}")
    _check(f.dtype == h.dtype, op, f"f must have the dtype of h ({_dtype(h)}), got {_dtype(f)}")
    _check(s.dtype.is_floating_point, op, f"s must be a floating-point tensor, got {_dtype(s)}")
    d = h.shape[2]
    _check(s.shape in ((), (d,)), op, f"s must be 0-dim or shape (D,)=({d},), got {tuple(s.shape)}")
    _check(f.device == h.device, op, f"f must be on the device of h ({h.device}), got {f.device}")
    _check(s.device == h.device, op, f"s must be on the device of h ({h.device}), got {s.device}")


def _check_x(op: str, x: torch.Tensor, kernel: bool) -> None:
    _check(x.dim() == 3, op, f"x must have shape (B, T, D), got {tuple(x.shape)}")
    if kernel:
        _check(x.dtype in _KERNEL_DTYPES, op, f"x must be float32, bfloat16 or float16, got {_dtype(x)}")
    _check(x.dtype.is_floating_point, op, f"x must be a floating-point tensor, got {_dtype(x)}")


def _check_modulation(op: str, name: str, m: torch.Tensor, x: torch.Tensor) -> None:
    b, _, d = x.shape
    _check(
        m.shape in ((b, d), (b, 1, d)),
        op,
        f"{name} must have shape (B, D)=({b}, {d}) or (B, 1, D)=({b}, 1, {d}), got {tuple(m.shape)}",
    )
    _check(m.dtype.is_floating_point, op, f"{name} must be a floating-point tensor, got {_dtype(m)}")


def _check_table(op: str, name: str, t: torch.Tensor | None, x: torch.Tensor) -> None:
    if t is None:
        return
    d = x.shape[2]
    _check(t.shape == (d,), op, f"{name} must have shape (D,)=({d},), got {tuple(t.shape)}")
    _check(t.dtype.is_floating_point, op, f"{name} must be a floating-point tensor, got {_dtype(t)}")
    _check(t.device == x.device, op, f"{name} must be on the device of x ({x.device}), got {t.device}")


def _check_ada_layernorm(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    shift_table: torch.Tensor | None = None,
    scale_table: torch.Tensor | None = None,
    kernel: bool = False,
) -> None:
    op = "ada_layernorm"
    _check_x(op, x, kernel)
    _check_modulation(op, "shift", shift, x)
    _check_modulation(op, "scale", scale, x)
    _check(eps >= 0, op, f"eps must be >= 0, got {eps:g}")
    for name, m in (("shift", shift), ("scale", scale)):
        _check(m.device == x.device, op, f"{name} must be on the device of x ({x.device}), got {m.device}")
    _check_table(op, "shift_table", shift_table, x)
    _check_table(op, "scale_table", scale_table, x)


def _check_gated_residual(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    gate_table: torch.Tensor | None,
    f: torch.Tensor | None,
    s: torch.Tensor | None,
    kernel: bool = False,
) -> None:
    op = "gated_residual"
    _check_x(op, x, kernel)
    _check(y.shape == x.shape, op, f"y must have shape (B, T, D)={tuple(x.shape)}, got {tuple(y.shape)}")
    _check(y.dtype == x.dtype, op, f"y must have the dtype of x ({_dtype(x)}), got {_dtype(y)}")
    _check_modulation(op, "gate", gate, x)
    for name, t in (("y", y), ("gate", gate)):
        _check(t.device == x.device, op, f"{name} must be on the device of x ({x.device}), got {t.device}")
    _check_table(op, "gate_table", gate_table, x)
    _check((f is None) == (s is None), op, "f and s must be given together")
    if f is None:
        return
    d = x.shape[2]
    _check(f.shape == x.shape, op, f"f must have shape (B, T, D)={tuple(x.shape)}, got {tuple(f.shape)}")
    _check(f.dtype == x.dtype, op, f"f must have the dtype of x ({_dtype(x)}), got {_dtype(f)}")
    _check(s.dtype.is_floating_point, op, f"s must be a floating-point tensor, got {_dtype(s)}")
    _check(s.shape in ((), (d,)), op, f"s must be 0-dim or shape (D,)=({d},), got {tuple(s.shape)}")
    for name, t in (("f", f), ("s", s)):
        _check(t.device == x.device, op, f"{name} must be on the device of x ({x.device}), got {t.device}")


def feedback_inject_ref(h: torch.Tensor, f: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Reference of `feedback_inject`: ``h + s * f`` computed in (at least) fp32, in h's dtype."""
    _check_feedback_inject(h, f, s)
    ct = torch.promote_types(h.dtype, torch.float32)
    out = torch.addcmul(h.to(ct), s.to(ct), f.to(ct))  # (B, T, D); s broadcasts from () or (D,)
    return out.to(h.dtype)


def _mod(m: torch.Tensor, table: torch.Tensor | None, ct: torch.dtype) -> torch.Tensor:
    """A (B, D) / (B, 1, D) modulation plus its optional (D,) table row, as (B, 1, D) in ct."""
    b, d = m.shape[0], m.shape[-1]
    m = m.reshape(b, 1, d).to(ct)  # (B, 1, D)
    return m if table is None else m + table.to(ct)


def ada_layernorm_ref(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    shift_table: torch.Tensor | None = None,
    scale_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of `ada_layernorm`: ``layer_norm(x) * (1 + scale) + shift`` in (at least) fp32,
    with the tables added to shift and scale first."""
    _check_ada_layernorm(x, shift, scale, eps, shift_table, scale_table)
    d = x.shape[2]
    ct = torch.promote_types(x.dtype, torch.float32)
    y = F.layer_norm(x.to(ct), (d,), eps=eps)  # (B, T, D)
    shift = _mod(shift, shift_table, ct)  # (B, 1, D)
    scale = _mod(scale, scale_table, ct)  # (B, 1, D)
    return torch.addcmul(shift, y, 1 + scale).to(x.dtype)


def gated_residual_ref(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    gate_table: torch.Tensor | None = None,
    f: torch.Tensor | None = None,
    s: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of `gated_residual`: ``x + gate * y`` in (at least) fp32, rounded to x's dtype; with
    ``f, s`` then ``feedback_inject_ref(out, f, s)``."""
    _check_gated_residual(x, gate, y, gate_table, f, s)
    ct = torch.promote_types(x.dtype, torch.float32)
    out = torch.addcmul(x.to(ct), _mod(gate, gate_table, ct), y.to(ct)).to(x.dtype)  # (B, T, D)
    return out if f is None else feedback_inject_ref(out, f, s)


def feedback_inject(h: torch.Tensor, f: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Scaled feedback injection of the ILF loop: ``h + s * f``.

    Args:
        h: hidden states, (B, T, D).
        f: feedback, same shape and dtype as h.
        s: scale, 0-dim (one per loop block) or (D,) (per channel), any float dtype.

    Returns:
        (B, T, D) in h's dtype, computed in fp32.
    """
    if _use_ext("feedback_inject", h, f, s):
        return torch.ops.ilf.feedback_inject(h, f, s)
    return feedback_inject_ref(h, f, s)


def ada_layernorm(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    shift_table: torch.Tensor | None = None,
    scale_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """DiT's adaLN / PixArt's adaLN-single modulation: ``layer_norm(x) * (1 + scale) + shift``.

    Args:
        x: (B, T, D); normalised over D without affine parameters, statistics in fp32.
        shift: (B, D) or (B, 1, D), broadcast over T.
        scale: (B, D) or (B, 1, D), broadcast over T.
        eps: added to the variance.
        shift_table, scale_table: optional (D,) rows added to shift and scale (PixArt's
            ``scale_shift_table``; the per-sample part is then the timestep embedding's chunk).

    Returns:
        (B, T, D) in x's dtype.
    """
    tensors = [t for t in (x, shift, scale, shift_table, scale_table) if t is not None]
    if _use_ext("ada_layernorm", *tensors):
        return torch.ops.ilf.ada_layernorm(x, shift, scale, eps, shift_table, scale_table)
    return ada_layernorm_ref(x, shift, scale, eps, shift_table, scale_table)


def gated_residual(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    gate_table: torch.Tensor | None = None,
    f: torch.Tensor | None = None,
    s: torch.Tensor | None = None,
) -> torch.Tensor:
    """A block's gated residual ``x + gate * y``, optionally followed by the next loop block's
    feedback injection ``+ s * f`` in the same pass.

    Args:
        x: residual stream, (B, T, D).
        gate: (B, D) or (B, 1, D), broadcast over T (adaLN-Zero's gate_msa / gate_mlp).
        y: branch output (attention or feed-forward), like x.
        gate_table: optional (D,) row added to gate (PixArt's ``scale_shift_table``).
        f, s: optional feedback (like x) and scale (0-dim or (D,)); both or neither.

    Returns:
        (B, T, D) in x's dtype: ``round(x + gate * y)``, then ``round(out + s * f)`` when f is given,
        which equals ``feedback_inject(gated_residual(x, gate, y), f, s)``.
    """
    tensors = [t for t in (x, gate, y, gate_table, f, s) if t is not None]
    if _use_ext("gated_residual", *tensors):
        return torch.ops.ilf.gated_residual(x, gate, y, gate_table, f, s)
    return gated_residual_ref(x, gate, y, gate_table, f, s)


if _EXT_DEVICES:
    # Shapes for torch.compile, FakeTensorMode and meta tensors; the kernels return contiguous outputs.

    @torch.library.register_fake("ilf::feedback_inject")
    def _feedback_inject_fake(h, f, s):
        _check_feedback_inject(h, f, s, kernel=True)
        return h.new_empty(h.shape)

    @torch.library.register_fake("ilf::ada_layernorm")
    def _ada_layernorm_fake(x, shift, scale, eps, shift_table=None, scale_table=None):
        _check_ada_layernorm(x, shift, scale, eps, shift_table, scale_table, kernel=True)
        return x.new_empty(x.shape)

    @torch.library.register_fake("ilf::gated_residual")
    def _gated_residual_fake(x, gate, y, gate_table=None, f=None, s=None):
        _check_gated_residual(x, gate, y, gate_table, f, s, kernel=True)
        return x.new_empty(x.shape)
