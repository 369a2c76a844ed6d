"""Quality of the text-to-image demo model (`fashion-t2i`): training progress per chunk, guidance sweep.

    python benchmarks/t2i_model.py progress runs/fashion-t2i/model-step9000 [--per-prompt 20]
    python benchmarks/t2i_model.py sweep MODEL [--scales 1.5,2,3,4.5,6] [--per-prompt 20] [--write-defaults]
    python benchmarks/t2i_model.py prompts benchmarks/fashion_t2i_prompts.txt

`prompts` writes the benchmark's prompts: every (class, colour) pair once, in a phrasing no training
caption uses (``HELD_OUT_TEMPLATE``), so that every prompt is new to the model and to the feedback
weights (the 6 pairs of `HELD_OUT` are new as pairs, too).

`progress` measures one exported checkpoint (`scripts/train_t2i.py --resume --export-only`) at 20
steps and a fixed guidance, and appends a row to benchmarks/results/fashion_t2i_training.md with the
mean training loss of its last 500 steps (from the run's loss.csv). `sweep` evaluates each guidance
scale on seeds from 10,000,000 (not the evaluation seeds), picks the highest full-prompt accuracy
(ties within one SE: the lower FID) and with ``--write-defaults`` records it in the model's
ilf_defaults.json. Both use `ilf_runtime.fashion.evaluate_prompts`.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ilf_runtime import load_model
from ilf_runtime.fashion.evaluate import EvalArgs
from ilf_runtime.fashion.evaluate_prompts import (
    PROMPT_MARKDOWN_HEADER,
    evaluate_prompts,
    prompt_markdown_row,
)

RESULTS = Path(__file__).parent / "results"


def _loss_tail(model_dir: Path, step: int, n: int = 500) -> float | None:
    log = model_dir.parent / "loss.csv"
    if not log.is_file():
        return None
    with log.open() as f:
        rows = [r for r in csv.DictReader(f) if step - n < int(r["step"]) <= step]
    return sum(float(r["loss"]) for r in rows) / len(rows) if rows else None


def progress(a: argparse.Namespace) -> int:
    d = Path(a.model)
    trained = json.loads((d / "training.json").read_text())
    step = int(trained["steps"])
    r = evaluate_prompts(load_model(d), EvalArgs(per_class=a.per_prompt, steps=20, guidance=a.guidance))
    loss = _loss_tail(d, step)
    acc = r["accuracy"]["all"]
    out = RESULTS / "fashion_t2i_training.md"
    if not out.is_file():
        out.write_text(
            "# fashion-t2i training progress\n\nPer exported checkpoint: 20 DDIM steps, "
            f"{a.per_prompt} images per (class, colour) prompt (seeds from 0), `benchmarks/t2i_model.py progress`, "
            f"{r['context']['dtype']}, {r['context']['threads']} threads, torch {r['context']['torch']}, "
            f"diffusers {r['context']['diffusers']}.\n\n"
            "| step | train minutes | loss (mean of last 500 steps) | guidance | class acc | colour acc | "
            "full-prompt acc | full, held-out pairs | FID |\n|---|---|---|---|---|---|---|---|---|\n"
        )
    minutes = trained.get("train_seconds", 0) / 60
    loss_text = "-" if loss is None else f"{loss:.4f}"
    with out.open("a") as f:
        f.write(
            f"| {step} | {minutes:.0f} | {loss_text} | {a.guidance} | "
            f"{100 * acc['class']['acc']:.1f} ± {100 * acc['class']['se']:.1f}% | "
            f"{100 * acc['colour']['acc']:.1f} ± {100 * acc['colour']['se']:.1f}% | "
            f"{100 * acc['full']['acc']:.1f} ± {100 * acc['full']['se']:.1f}% | "
            f"{100 * r['accuracy']['held_out']['full']['acc']:.1f}% | {r['fid']['fid']:.2f} |\n"
        )
    print(prompt_markdown_row(r))
    print(f"appended step {step} to {out}")
    return 0


def sweep(a: argparse.Namespace) -> int:
    model = load_model(a.model)
    rows = []
    for g in (float(s) for s in a.scales.split(",")):
        r = evaluate_prompts(model, EvalArgs(per_class=a.per_prompt, steps=20, guidance=g, seed=10_000_000))
        rows.append(r)
        print(prompt_markdown_row(r), flush=True)
    top = max(rows, key=lambda r: r["accuracy"]["all"]["full"]["acc"])
    close = [
        r
        for r in rows
        if r["accuracy"]["all"]["full"]["acc"]
        >= top["accuracy"]["all"]["full"]["acc"] - top["accuracy"]["all"]["full"]["se"]
    ]
    best = min(close, key=lambda r: r["fid"]["fid"])
    g = best["args"]["guidance"]
    c = rows[0]["context"]
    (RESULTS / "fashion_t2i_sweep.md").write_text(
        f"# Guidance sweep of {a.model}: 20 steps, {a.per_prompt} images per prompt, seeds from 10,000,000\n\n"
        f"{c['dtype']}, {c['threads']} threads, torch {c['torch']}, diffusers {c['diffusers']}. Quality "
        "figures; images/s is the sampling rate of the run, not a benchmark (no warm-up, no repeats).\n\n"
        f"{PROMPT_MARKDOWN_HEADER}\n"
        + "\n".join(prompt_markdown_row(r) for r in rows)
        + f"\n\nChosen: guidance {g} (highest full-prompt accuracy; within one SE of it, the lowest FID).\n"
    )
    if a.write_defaults:
        f = Path(model.transformer.config._name_or_path) / "ilf_defaults.json"
        d = json.loads(f.read_text()) if f.is_file() else {}
        f.write_text(
            json.dumps(d | {"guidance_scale": g, "source": "benchmarks/results/fashion_t2i_sweep.md"}) + "\n"
        )
    print(f"guidance {g}")
    return 0


HELD_OUT_TEMPLATE = "a picture of a {colour} {garment}"


def prompts(a: argparse.Namespace) -> int:
    from ilf_runtime.fashion.captions import CLASS_WORDS, COLOURS, TEMPLATES, fix_articles, parse

    assert HELD_OUT_TEMPLATE not in TEMPLATES
    lines = [
        fix_articles(HELD_OUT_TEMPLATE.format(colour=k.name, garment=CLASS_WORDS[c][0]))
        for c in range(len(CLASS_WORDS))
        for k in COLOURS
    ]
    assert all(parse(t) is not None for t in lines)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} prompts to {a.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("progress")
    p.add_argument("model")
    p.add_argument("--per-prompt", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.5)
    s = sub.add_parser("sweep")
    s.add_argument("model")
    s.add_argument("--scales", default="1.5,2.0,3.0,4.5,6.0")
    s.add_argument("--per-prompt", type=int, default=20)
    s.add_argument("--write-defaults", action="store_true")
    q = sub.add_parser("prompts")
    q.add_argument("out")
    a = ap.parse_args(argv)
    return {"progress": progress, "sweep": sweep, "prompts": prompts}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
