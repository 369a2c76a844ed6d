"""The quality bar of the shipped feedback weights: plain 20 steps (the reference), plain 8..16 steps
(the equal-cost baselines) and each ILF weights file, in one run on the same noise and labels.

    python benchmarks/ilf_quality.py                      # the shipped weights, 2,000 images
    python benchmarks/ilf_quality.py --weights a.safetensors --weights b.safetensors --n 3000

Per row: block evaluations per image, paired PSNR against the 20-step images (mean +- standard error),
FID against the Fashion-MNIST test split with its spread over disjoint subsets (features: the bundled
classifier's penultimate layer), class accuracy. For each ILF row, the paired PSNR difference to the
plain row of equal block evaluations (the smallest step count that costs at least as much), with its
standard error, and the verdict of each criterion of the bar. Writes
``benchmarks/results/ilf_quality.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def _row(name: str, out, ref_images, feats_fn, ref_sets, labels, subsets: int) -> dict:
    from ilf_runtime.fashion.classifier import class_accuracy, load_fashion_classifier
    from ilf_runtime.metrics import fid_with_spread, paired_psnr

    clf = load_fashion_classifier()
    pp = paired_psnr(out.images, ref_images)
    return {
        "row": name,
        "steps": out.info["num_steps"],
        "block_evals": out.info["block_evals_per_image"],
        "loop_mask": out.info["loop_mask"],
        "seconds": round(out.seconds, 2),
        "psnr": pp["psnr"],
        "psnr_se": pp["psnr_se"],
        "per_image_psnr": pp["per_image_psnr"],
        "fid": fid_with_spread(feats_fn(out.images), ref_sets["ref"], subsets),
        "class_accuracy": class_accuracy(clf, out.images, labels),
    }


def main(argv: list[str] | None = None) -> int:
    import diffusers

    from ilf_runtime import load_model, sample, shipped_weights
    from ilf_runtime.config import ILFConfig
    from ilf_runtime.fashion.classifier import load_fashion_classifier
    from ilf_runtime.fashion.evaluate import reference_sets
    from ilf_runtime.metrics import extract
    from ilf_runtime.weights import read_metadata

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", action="append", help="feedback weights file (repeatable; default: shipped)")
    p.add_argument("--n", type=int, default=2000, help="images per row (a multiple of 10)")
    p.add_argument("--subsets", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plain-steps", default="8,9,10,11,12,13,14,15,16")
    p.add_argument("--out", default=str(ROOT / "results" / "ilf_quality"))
    p.add_argument("--batch-size", type=int, default=250)
    args = p.parse_args(argv)

    m = load_model("fashion-dit")
    weights = args.weights or [str(w) for w in shipped_weights("fashion-dit").values()]
    layers = len(m.transformer.transformer_blocks)
    labels = torch.arange(10).repeat(args.n // 10)  # 0..9, 0..9, ...: every FID subset holds every class
    seeds = list(range(args.seed, args.seed + labels.numel()))
    common = {"class_labels": labels, "seeds": seeds, "batch_size": args.batch_size}
    clf = load_fashion_classifier()
    ref_sets = reference_sets(labels.numel(), args.subsets, args.seed)

    def feats(images):
        return extract(clf.features, images)

    t0 = time.perf_counter()
    ref = sample(m, num_steps=20, **common)
    rows = [_row("plain 20", ref, ref.images, feats, ref_sets, labels, args.subsets)]
    plain_steps = {int(x) for x in args.plain_steps.split(",")}
    for w in weights:  # every ILF row gets its equal-cost plain row, inside 8..16 or not
        meta = read_metadata(w)
        cfg = ILFConfig.from_dict(meta["ilf_config"])
        steps = int(meta["sampler"]["num_steps"])
        plain_steps.add(math.ceil(cfg.block_evals(layers, steps, meta["sampler"].get("loop_steps")) / layers))
    for s in sorted(plain_steps):
        rows.append(
            _row(
                f"plain {s}",
                sample(m, num_steps=s, **common),
                ref.images,
                feats,
                ref_sets,
                labels,
                args.subsets,
            )
        )
        print(f"plain {s}: {rows[-1]['psnr']:.2f} dB", flush=True)
    plain = {r["steps"]: r for r in rows if r["row"].startswith("plain")}
    verdicts = []
    for w in weights:
        meta = read_metadata(w)
        steps = int(meta["sampler"]["num_steps"])
        out = sample(m, num_steps=steps, ilf=w, **common)
        r = _row(f"ILF {Path(w).name}", out, ref.images, feats, ref_sets, labels, args.subsets)
        r["weights"] = str(w)
        r["ilf_config"] = meta["ilf_config"]
        r["training"] = {k: meta["training"].get(k) for k in ("steps", "seconds", "world_size")}
        eq = math.ceil(r["block_evals"] / layers)
        r["equal_cost_steps"] = eq
        if eq in plain:
            base = plain[eq]
            d = r["per_image_psnr"] - base["per_image_psnr"]
            gain, se = float(d.mean()), float(d.std() / math.sqrt(d.numel()))
            spread = max(base["fid"]["subset_std"], r["fid"]["subset_std"])
            r["vs_equal_cost"] = {
                "gain_db": gain,
                "gain_se": gain and se,
                "gain_at_least_1db": gain >= 1.0,
                "gain_over_3se": gain > 3 * se,
                "fid_delta": r["fid"]["fid"] - base["fid"]["fid"],
                "fid_spread": spread,
                "fid_not_worse_beyond_spread": r["fid"]["fid"] - base["fid"]["fid"] <= spread,
                "class_acc_within_1pt_of_20": abs(r["class_accuracy"] - rows[0]["class_accuracy"]) <= 0.01,
            }
            verdicts.append(all(v for k, v in r["vs_equal_cost"].items() if isinstance(v, bool)))
        rows.append(r)
        print(f"{r['row']}: {r['psnr']:.2f} dB, {r.get('vs_equal_cost')}", flush=True)
    context = {
        "n": labels.numel(),
        "seeds": [seeds[0], seeds[-1]],
        "solver": "ddim (trailing)",
        "guidance": m.guidance,
        "device": str(m.device),
        "dtype": str(m.dtype),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "feature_network": "ilf_runtime/assets/fashion-classifier (penultimate layer, 256-d)",
        "fid_floor": ref_sets["floor"],
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    for r in rows:
        r.pop("per_image_psnr")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"context": context, "rows": rows}, indent=1))
    Path(args.out).with_suffix(".md").write_text(render(rows, context))
    print(render(rows, context))
    return 0 if verdicts and all(verdicts) else 1


def render(rows: list[dict], ctx: dict) -> str:
    lines = [
        (
            "| row | steps | block evals | PSNR vs 20 steps (dB) | gain over plain at equal cost (dB) | "
            "FID (subset mean +- std) | class acc |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        v = r.get("vs_equal_cost")
        gain = f"{v['gain_db']:+.2f} +- {v['gain_se']:.2f} (vs plain {r['equal_cost_steps']})" if v else ""
        psnr = "reference" if r["row"] == "plain 20" else f"{r['psnr']:.2f} +- {r['psnr_se']:.2f}"
        f = r["fid"]
        lines.append(
            f"| {r['row']} | {r['steps']} | {r['block_evals']} | {psnr} | {gain} | "
            f"{f['fid']:.3f} ({f['subset_mean']:.2f} +- {f['subset_std']:.2f}) | {100 * r['class_accuracy']:.1f}% |"
        )
    lines.append("")
    for r in rows:
        v = r.get("vs_equal_cost")
        if v:
            checks = ", ".join(
                f"{k}: {'yes' if val else 'NO'}" for k, val in v.items() if isinstance(val, bool)
            )
            lines.append(
                f"- {r['row']} ({json.dumps(r['ilf_config'], sort_keys=True)}; trained {r['training']['steps']} steps "
                f"in {r['training']['seconds'] / 60:.1f} min): {checks}; FID delta {v['fid_delta']:+.3f} "
                f"(spread {v['fid_spread']:.3f})"
            )
    lines.append(
        f"\n{ctx['n']} images per row, seeds {ctx['seeds'][0]}..{ctx['seeds'][1]}, labels i mod 10, {ctx['solver']}, "
        f"guidance {ctx['guidance']}, {ctx['device']} {ctx['dtype']}, {ctx['threads']} threads, torch {ctx['torch']}, "
        f"diffusers {ctx['diffusers']}. FID features: {ctx['feature_network']}; FID floor (train images vs test split) "
        f"{ctx['fid_floor']['fid']:.3f}. Standard errors are of the per-image (paired) values. "
        f"Wall time {ctx['wall_seconds'] / 60:.1f} min.\n"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
