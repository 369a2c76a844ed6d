"""Quality of the bundled Fashion-MNIST DiT: guidance sweep, then FID on 10,000 samples.

    python benchmarks/bundled_model.py [--model fashion-dit] [--sweep-per-class 100] [--per-class 1000]

1. Sweeps the guidance scale at 20 steps (`--sweep-per-class` images per class each) and picks the
   scale with the lowest FID.
2. At that scale: FID on `--per-class` x 10 samples against the test split with its spread over 5
   disjoint subsets and its floor at the same sample size, class accuracy.
3. A grid with one row per class.

Writes benchmarks/results/fashion_dit_{sweep,metrics}.{json,md} and fashion_dit_grid.png.
Features: the shipped classifier (ilf_runtime/assets/fashion-classifier), not Inception.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ilf_runtime import load_model, sample
from ilf_runtime.fashion.evaluate import MARKDOWN_HEADER, EvalArgs, evaluate, markdown_row
from ilf_runtime.images import save_grid

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fashion-dit")
    ap.add_argument("--scales", default="1.0,1.5,2.0,2.5,3.0,4.0")
    ap.add_argument("--sweep-per-class", type=int, default=100)
    ap.add_argument("--per-class", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--write-defaults",
        action="store_true",
        help="record the chosen guidance as the built-in model's default (assets/fashion-dit/ilf_defaults.json)",
    )
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(a.model)

    sweep = []
    for g in (float(s) for s in a.scales.split(",")):
        r = evaluate(model, EvalArgs(per_class=a.sweep_per_class, steps=a.steps, guidance=g, seed=10_000_000))
        sweep.append(r)
        print(markdown_row(r), flush=True)
    best = min(sweep, key=lambda r: r["fid"]["fid"])
    g_best = best["args"]["guidance"]
    (out / "fashion_dit_sweep.json").write_text(json.dumps(sweep, indent=1, default=str))
    (out / "fashion_dit_sweep.md").write_text(
        f"# Guidance sweep, {a.steps} steps, {a.sweep_per_class * 10} samples per scale (seeds from 10,000,000)\n\n"
        f"{MARKDOWN_HEADER}\n"
        + "\n".join(markdown_row(r) for r in sweep)
        + f"\n\nLowest FID at guidance {g_best}.\n"
    )

    if a.write_defaults:
        from ilf_runtime.registry import MODEL_NAMES

        defaults = {
            "guidance_scale": g_best,
            "source": "benchmarks/results/fashion_dit_sweep.md (lowest FID)",
        }
        (Path(MODEL_NAMES[a.model][0]) / "ilf_defaults.json").write_text(
            json.dumps(defaults, indent=1) + "\n"
        )
    final = evaluate(model, EvalArgs(per_class=a.per_class, steps=a.steps, guidance=g_best, seed=0))
    (out / "fashion_dit_metrics.json").write_text(json.dumps(final, indent=1, default=str))
    fl = final["fid_floor"]
    trained = json.loads((Path(model.transformer.config._name_or_path) / "training.json").read_text())
    (out / "fashion_dit_metrics.md").write_text(
        f"# Bundled model quality, {a.steps} steps, guidance {g_best}\n\n{MARKDOWN_HEADER}\n{markdown_row(final)}\n\n"
        "FID: features of the shipped classifier (penultimate layer, 256-d), against the 10,000-image test split; "
        f"the floor is {final['n']:,} train-split images against the test split. The classifier's own test "
        f"accuracy is {100 * final['classifier_test_accuracy']:.2f}% "
        "(ilf_runtime/assets/fashion-classifier/config.json).\n"
        f"Floor spread over {len(fl['subsets'])}x{fl['subset_n']}: {fl['subset_mean']:.3f} +- {fl['subset_std']:.3f}. "
        f"Training time of the model: {trained['train_seconds'] / 60:.1f} minutes (benchmarks/results/backbone.md).\n"
    )
    print(markdown_row(final))

    labels = torch.arange(10).repeat_interleave(10)
    grid = sample(
        model, class_labels=labels, seeds=list(range(100)), num_steps=a.steps, guidance_scale=g_best
    )
    save_grid(grid.images, out / "fashion_dit_grid.png", nrow=10)
    print(f"guidance {g_best}; wrote {out}/fashion_dit_*.{{json,md}} and fashion_dit_grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
