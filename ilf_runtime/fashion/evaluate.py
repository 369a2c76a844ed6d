"""`ilf eval`: sample N images per class from a class-conditional model and measure them.

Reports FID against the Fashion-MNIST test split (features of the shipped classifier) with its
spread over disjoint subsets and the floor at the same sample size (train-split images against
the test split), class accuracy, and optionally paired PSNR / MAE against a reference sampler
(plain, `ref_steps` steps) run from the same seeds and labels.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ilf_runtime.fashion import unsupported_reason
from ilf_runtime.fashion.classifier import CLASSIFIER_DIR, class_accuracy, load_fashion_classifier
from ilf_runtime.fashion.data import load_fashion_mnist
from ilf_runtime.fashion.eval_args import EvalArgs
from ilf_runtime.metrics import Gaussian, extract, fid_with_spread, paired_psnr

logger = logging.getLogger(__name__)

__all__ = [
    "MARKDOWN_HEADER",
    "EvalArgs",
    "evaluate",
    "markdown_row",
    "paired_vs_ref",
    "reference_sets",
    "run_context",
    "run_summary",
    "write_results",
]


def _to01(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div(255).unsqueeze(1)  # (N, 1, 28, 28) in [0, 1]


@functools.lru_cache(maxsize=1)
def _test_gaussian():
    """Features of the whole Fashion-MNIST test split under the shipped classifier, fitted once."""
    return Gaussian.fit(extract(load_fashion_classifier().features, _to01(load_fashion_mnist("test").images)))


@functools.lru_cache(maxsize=8)
def reference_sets(n: int, subsets: int, seed: int) -> dict[str, Any]:
    """Test-split Gaussian (``ref``) and the floor: FID of n train-split images (drawn with `seed`)
    against the test split, with its spread over `subsets` (``floor``). Cached."""
    train = load_fashion_mnist("train")
    ref = _test_gaussian()
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    floor = fid_with_spread(
        extract(load_fashion_classifier().features, _to01(train.images[idx])), ref, subsets
    )
    return {"ref": ref, "floor": floor}


def _recorded_accuracy() -> float | None:
    f = CLASSIFIER_DIR / "config.json"
    return json.loads(f.read_text()).get("test_accuracy") if f.is_file() else None


def evaluate(model: Any, a: EvalArgs, *, progress: bool = True) -> dict[str, Any]:
    """Samples `per_class` images of every class and returns the metrics as a JSON-able dict."""
    from dataclasses import replace

    from ilf_runtime.pipelines import sample
    from ilf_runtime.registry import to_model

    m = to_model(model)
    if a.guidance is None:
        a = replace(a, guidance=m.guidance)
    reason = unsupported_reason(m)
    if reason:
        raise ValueError(f"ilf eval's metrics use the Fashion-MNIST classifier: {reason}")
    num_classes = m.adapter.num_classes(m.transformer)
    if a.per_class < 1 or a.subsets < 1 or a.per_class * num_classes < 2 * a.subsets:
        raise ValueError("need per_class >= 1 and at least two images per FID subset")
    labels = torch.arange(num_classes).repeat_interleave(a.per_class)
    # interleave classes so that every disjoint FID subset holds every class
    labels = labels.view(num_classes, a.per_class).T.reshape(-1)
    n = labels.numel()
    seeds = list(range(a.seed, a.seed + n))
    common = {
        "class_labels": labels,
        "seeds": seeds,
        "solver": a.solver,
        "guidance_scale": a.guidance,
        "batch_size": a.batch_size,
        "progress": progress,
    }
    out = sample(m, num_steps=a.steps, ilf=a.weights, loop_steps=a.loop_steps, **common)
    clf = load_fashion_classifier()
    sets = reference_sets(n, a.subsets, a.seed)
    feats = extract(clf.features, out.images)
    result: dict[str, Any] = {
        **run_summary(m, a, out),
        "fid": fid_with_spread(feats, sets["ref"], a.subsets),
        "fid_floor": sets["floor"],
        "class_accuracy": class_accuracy(clf, out.images, labels),
        "feature_network": "ilf_runtime/assets/fashion-classifier (penultimate layer, 256-d)",
        "classifier_test_accuracy": _recorded_accuracy(),
        "context": run_context(m),
    }
    if a.ref_steps:
        result["paired_vs_ref"] = paired_vs_ref(
            out.images, sample(m, num_steps=a.ref_steps, **common).images, a.ref_steps
        )
    for key in ("fid", "fid_floor"):
        result[key] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result[key].items()}
    return result


def run_summary(m: Any, a: Any, out: Any) -> dict[str, Any]:
    """The head of an evaluation's result: model, arguments, images, seeds, time and cost of `out`
    (a `pipelines.SampleOutput`)."""
    n = len(out.seeds)
    return {
        "model": m.name or type(m.transformer).__name__,
        "args": asdict(a),
        "n": n,
        "seeds": [out.seeds[0], out.seeds[-1]],
        "seconds": round(out.seconds, 2),
        "images_per_s": round(n / out.seconds, 2),
        "block_evals_per_image": out.info["block_evals_per_image"],
        "solver": out.info["solver"],
    }


def run_context(m: Any) -> dict[str, Any]:
    """What an evaluation's numbers depend on besides its arguments: device, dtype, threads, versions."""
    import diffusers

    return {
        "device": str(m.device),
        "dtype": str(m.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def paired_vs_ref(images: torch.Tensor, ref_images: torch.Tensor, ref_steps: int) -> dict[str, Any]:
    """Paired PSNR / MAE summary against the reference sampler's images (no per-image values)."""
    pp = paired_psnr(images, ref_images)
    pp.pop("per_image_psnr")
    return pp | {"ref_steps": ref_steps}


def markdown_row(r: dict[str, Any]) -> str:
    a, f, fl = r["args"], r["fid"], r["fid_floor"]
    psnr = r.get("paired_vs_ref")
    ps = f"{psnr['psnr']:.2f} +- {psnr['psnr_se']:.2f}" if psnr else "-"
    return (
        f"| {r['model']} | {r['solver']} | {a['steps']} | {a['guidance']} | {a['weights'] or '-'} | {r['n']} | "
        f"{f['fid']:.3f} ({f['subset_mean']:.2f} +- {f['subset_std']:.2f} over {a['subsets']}x{f['subset_n']}) | "
        f"{fl['fid']:.3f} | {100 * r['class_accuracy']:.1f}% | {ps} | {r['images_per_s']:.1f} |"
    )


MARKDOWN_HEADER = (
    "| model | solver | steps | guidance | weights | n | FID (subset mean +- std) | FID floor | class acc | "
    "PSNR vs ref (dB) | images/s |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def write_results(
    results: list[dict[str, Any]], stem: str | Path, row=markdown_row, header: str = MARKDOWN_HEADER
) -> None:
    """STEM.json and STEM.md (one table row per result, formatted by `row` under `header`)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    rows = "\n".join(row(r) for r in results)
    stem.with_suffix(".md").write_text(f"{header}\n{rows}\n")
