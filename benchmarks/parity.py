"""Sampler parity: this project's loop against diffusers' DiTPipeline / PixArtAlphaPipeline loops.

Runs every (model, scheduler, guidance, steps) case on tiny models from the same initial noise and
writes the max abs difference of the final latents (fp32, CPU) to benchmarks/results/parity.{md,json}.

    python benchmarks/parity.py
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import diffusers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fixtures: the tiny models
from tests.fixtures.parity import SCHEDULERS, dit_parity, pixart_parity


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "parity"), help="output path stem"
    )
    args = ap.parse_args(argv)
    rows = []
    for steps in (3, 7, 20):
        for sched in sorted(SCHEDULERS):
            for g in (1.0, 4.0):
                rows.append(dit_parity(sched, g, steps))
            for g in (1.0, 4.5):
                rows.append(pixart_parity(sched, g, steps))
    context = {
        "device": "cpu",
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "commit": _commit(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"context": context, "rows": [dict(vars(r), relative=r.relative) for r in rows]}
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    lines = [
        "# Sampler parity against the diffusers pipelines",
        "",
        "Final latents of this project's loop vs the pipeline's own loop, same initial noise, tiny models.",
        "Random tiny models push latents to large magnitudes, so the difference is also given per unit",
        "of the latents' magnitude (`relative` = max abs diff / max(1, max |latent|)).",
        "",
        "Context: " + ", ".join(f"{k} {v}" for k, v in context.items()),
        "",
        "| model | scheduler | guidance | steps | max abs diff | max abs latent | relative |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.scheduler} | {r.guidance} | {r.steps} | {r.max_abs_diff:.2e} | "
            f"{r.magnitude:.1f} | {r.relative:.1e} |"
        )
    worst = max(rows, key=lambda r: r.relative)
    worst_abs = max(r.max_abs_diff for r in rows)
    lines += [
        "",
        (
            f"Worst case: {worst.model} {worst.scheduler} g={worst.guidance} {worst.steps} steps, "
            f"relative {worst.relative:.1e}; max abs diff over all rows {worst_abs:.2e}."
        ),
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
