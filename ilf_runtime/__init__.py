"""ilf-runtime: fast sampling for diffusion transformers with Inner Loop Feedback.

Public API (the layers below are documented in docs/ARCHITECTURE.md):

- `ILFConfig`, `apply_ilf`, `remove_ilf`, `get_ilf`: attach / detach the feedback loop.
- `save_ilf_weights`, `load_ilf_weights`: feedback weights files (safetensors + metadata).
- `enable`, `disable`: ILF in the stock diffusers pipeline call (``pipe(...)`` runs the trained schedule).
- `sample`, `load_model`: sampling with this project's own denoising loop.
- `shipped_weights`: the feedback weights files shipped with a built-in model, by name.
- `ext_status`: what the compiled extension loaded, or why not.

Importing this package never initialises CUDA and works without the compiled extension.
"""

from ilf_runtime.config import ILFConfig
from ilf_runtime.ext import ext_status
from ilf_runtime.ilf import apply_ilf, get_ilf, remove_ilf
from ilf_runtime.pipelines import sample
from ilf_runtime.registry import load_model, shipped_weights
from ilf_runtime.stock import disable, enable
from ilf_runtime.weights import load_ilf_weights, save_ilf_weights

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
