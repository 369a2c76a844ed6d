"""Loading of the compiled extension ``ilf_runtime._C``, and what loaded (`ext_status`).

The extension is optional: when it is missing, fails to load, or ``ILF_DISABLE_EXT=1`` is set,
every op falls back to its pure-PyTorch reference in `ilf_runtime.ops`, and the reason is kept
for `ext_status`. Loading never initialises CUDA: whether CUDA kernels exist is read from a flag
compiled into the extension, not from the device.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

DISABLE_ENV = "ILF_DISABLE_EXT"

# The ops this version of the Python package expects from the extension, with their argument
# counts: a `_C` left over from an older build (an editable install not rebuilt after an update)
# registers fewer or different ops and must not be used.
EXPECTED_OPS = {"feedback_inject": 3, "ada_layernorm": 6, "gated_residual": 6}


def stale_ops() -> list[str]:
    """The expected ops the loaded `_C` lacks or registers with other argument counts."""
    import torch

    bad = []
    for name, nargs in EXPECTED_OPS.items():
        try:
            got = len(getattr(torch.ops.ilf, name).default._schema.arguments)
        except (AttributeError, RuntimeError):
            got = None
        if got != nargs:
            bad.append(f"{name} ({'missing' if got is None else f'{got} arguments, expected {nargs}'})")
    return bad


_status: dict[str, Any] | None = None


def _load() -> dict[str, Any]:
    global _status
    if _status is not None:
        return _status
    disabled = os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")
    status: dict[str, Any] = {
        "loaded": False,
        "reason": None,
        "path": None,
        "cuda_ops": False,
        "disabled_by_env": disabled,
    }
    if disabled:
        status["reason"] = f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    else:
        try:
            import torch  # noqa: F401  (loads libtorch/libc10, which _C links against)

            mod = importlib.import_module("ilf_runtime._C")
        # ImportError (not built), OSError / undefined symbols (ABI mismatch), RuntimeError (ops
        # registered twice): none of them may break `import ilf_runtime`.
        except Exception as e:  # noqa: BLE001
            status["reason"] = f"{type(e).__name__}: {e}"
        else:
            stale = stale_ops()
            if stale:
                status["reason"] = (
                    f"{getattr(mod, '__file__', '_C')} is out of date ({', '.join(stale)}); rebuild it with "
                    "pip install --no-build-isolation -e ."
                )
                logger.warning("ilf_runtime._C not used: %s", status["reason"])
            else:
                status.update(loaded=True, path=getattr(mod, "__file__", None), cuda_ops=bool(mod.with_cuda))
    if not status["loaded"]:
        logger.debug("ilf_runtime._C not used (%s); ops run their PyTorch references", status["reason"])
    _status = status
    return status


def ext_status() -> dict[str, Any]:
    """What the compiled extension loaded, or why not.

    Returns:
        ``{"loaded": bool, "reason": str | None, "path": str | None, "cuda_ops": bool,
        "disabled_by_env": bool}``; ``reason`` says why the extension is not used, ``cuda_ops``
        whether it was built with CUDA kernels.
    """
    return dict(_load())


def has_ext() -> bool:
    """True when ``ilf_runtime._C`` loaded and registered the ``torch.ops.ilf`` ops."""
    return bool(_load()["loaded"])
