"""ilf-runtime: fast sampling for diffusion transformers with Inner Loop Feedback.

Public API (the layers below are documented in docs/ARCHITECTURE.md):

- `ILFConfig`, `apply_ilf`, `remove_ilf`, `get_ilf`: attach / detach the feedback loop.
- `save_ilf_weights`, `load_ilf_weights`: feedback weights files (safetensors + metadata).
- `enable`, `disable`: ILF in the stock diffusers pipeline call (``pipe(...)`` runs the trained schedule).
- `sample`, `load_model`: sampling with this project's own denoising loop.
- `shipped_weights`: the feedback weights files shipped with a built-in model, by name.
- `ext_status`: what the compiled extension loaded, or why not.

Importing this package never initialises CUDA, works without the compiled extension and imports
torch only when one of these names is first used.
"""

import importlib
from typing import Any

# name -> module; imported on first use, so that `import ilf_runtime` (and `ilf --help`) stays fast
_EXPORTS = {
    "ILFConfig": "config",
    "ext_status": "ext",
    "apply_ilf": "ilf",
    "get_ilf": "ilf",
    "remove_ilf": "ilf",
    "sample": "pipelines",
    "load_model": "registry",
    "shipped_weights": "registry",
    "enable": "stock",
    "disable": "stock",
    "load_ilf_weights": "weights",
    "save_ilf_weights": "weights",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"ilf_runtime.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ilf_runtime' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

__all__ = [
    "ILFConfig",
    "__version__",
    "apply_ilf",
    "disable",
    "enable",
    "ext_status",
    "get_ilf",
    "load_ilf_weights",
    "load_model",
    "remove_ilf",
    "sample",
    "save_ilf_weights",
    "shipped_weights",
]
