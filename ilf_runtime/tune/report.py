"""What a search leaves to read: `candidates.csv` (one row per candidate) and `frontier.png`."""

from __future__ import annotations

import csv
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ilf_runtime.tune.search import Search

logger = logging.getLogger(__name__)

__all__ = ["CSV_FIELDS", "plot_frontier", "write_csv"]

CSV_FIELDS = (
    "name", "steps", "grid", "loop_start", "loop_end", "loop_steps", "loop_iters", "feedback_init", "block_evals",
    "baseline", "rung", "train_steps", "psnr", "psnr_se", "gain_db", "gain_se", "equal_cost_steps", "status",
)  # fmt: skip


def write_csv(s: Search) -> Path:
    """One row per candidate: its schedule and its last score."""
    path = s.out / "candidates.csv"
    scores = s.state["scores"]
    final = (s.state.get("final") or {}).get("name")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        last_rung = max((int(k) for k in scores), default=-1)
        for c in s.candidates:
            row: dict[str, Any] = asdict(c) | {"name": c.name, "block_evals": c.block_evals(s.layers)}
            last = s.last_score(c)
            if last is not None:
                row |= last[1]
                alive = last[0] == last_rung
                row["status"] = "winner" if c.name == final else ("final rung" if alive else "eliminated")
            else:
                row["status"] = "not scored"
            w.writerow(row)
    return path


def plot_frontier(s: Search, plain: dict[int, float]) -> Path | None:
    """PSNR against block evaluations: every candidate at its last rung, the plain sampler, the winner."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no frontier.png (pip install 'ilf-runtime[bench]')")
        return None
    scores = s.state["scores"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    cmap = plt.get_cmap("viridis")
    top = max((int(k) for k in scores), default=0)
    for c in s.candidates:
        last = s.last_score(c)
        if last is None:
            continue
        rung, r = last
        ax.scatter(r["block_evals"], r["psnr"], color=cmap(rung / max(1, top)), s=30 + 25 * rung,
                   marker="D" if c.baseline else "o", zorder=3)  # fmt: skip
    xs = sorted(plain)
    ax.plot([s.layers * k for k in xs], [plain[k] for k in xs], "k--", marker="x", label="plain sampler")
    final = s.state.get("final")
    if final:
        v = final["validation"]
        ax.scatter(v["block_evals"], v["psnr"], marker="*", s=300, color="red", zorder=4,
                   label=f"winner {final['name']} ({final['steps']} training steps)")  # fmt: skip
    ax.axvline(s.budget, color="grey", lw=0.8, label=f"budget {s.budget}")
    ax.scatter([], [], marker="D", color="grey", label="hand-set baseline")
    ax.set_xlabel("block evaluations per image")
    ax.set_ylabel(f"paired PSNR vs plain {s.a.teacher_steps} steps (dB)")
    ax.set_title(f"ilf tune: {s.a.model}; colour and size = rung reached")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    path = s.out / "frontier.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
