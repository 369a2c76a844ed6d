"""The pictures of an `ilf bench` run: the Pareto plot of quality against time, and the side-by-side
grid of the main job (plain | ILF | plain at ILF's cost)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

__all__ = ["frontier", "pareto_plot", "save_side_by_side"]


def frontier(xs: list[float], ys: list[float], lower_better: bool) -> list[int]:
    """Indices of the rows no faster row beats in quality, by time."""
    best, keep = math.inf, []
    for i in sorted(range(len(xs)), key=lambda k: (xs[k], ys[k] if lower_better else -ys[k])):
        q = ys[i] if lower_better else -ys[i]
        if q < best:
            best = q
            keep.append(i)
    return keep


def pareto_plot(
    tab: list[dict[str, Any]], context: dict[str, Any], summary: list[str], path: Path, band: float
) -> Path:
    """FID and paired PSNR against measured time, one point per row of `tab` (`report.table`), the
    frontier drawn, a grey band of +-`band` around each ILF row's time, the ILF summary lines below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = sorted({r["method"] for r in tab})
    colors = {f: plt.get_cmap("tab20")(k % 20) for k, f in enumerate(fams)}
    fig, axes = plt.subplots(1, 2, figsize=(15, 7.5))
    main_ref = f"plain {tab[0]['solver']} {context['args']['ref_steps']}"
    panels = [
        ("fid", "FID (lower is better)", True),
        ("psnr", f"paired PSNR (dB, higher is better) vs {main_ref}\n(squares: vs their own solver)", False),
    ]
    for ax, (key, ylabel, lower) in zip(axes, panels):
        pts = [r for r in tab if r[key] is not None and not (key == "psnr" and r["ref"] == "self")]
        if not pts:
            ax.text(0.5, 0.5, f"{key} not available for this model", ha="center", transform=ax.transAxes)
            continue
        xs = [1000 * r["time_per_image_s"] for r in pts]
        ys = [r[key] for r in pts]
        for x, y, r in zip(xs, ys, pts):
            ilf = r["method"].startswith("ilf")
            marker = "*" if ilf else ("o" if r["solver"] == pts[0]["solver"] else "s")
            ax.scatter(
                x,
                y,
                color=colors[r["method"]],
                marker=marker,
                s=160 if ilf else 40,
                zorder=3,
                edgecolors="black" if ilf else "none",
                label=r["method"],
            )
            tag = f"{r['steps']}" if r["method"] == "plain" else r["setting"].split(" loop")[0]
            ax.annotate(tag, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        for r in (q for q in pts if q["method"] == "ilf"):  # the equal-cost band around each ILF row
            t = 1000 * r["time_per_image_s"]
            ax.axvspan(t * (1 - band), t * (1 + band), color="grey", alpha=0.12, lw=0)
        # PSNR of another solver's rows is against that solver's own 20-step images: shown, but not
        # part of the frontier, which is drawn over the rows that share the main reference
        keep = [k for k, r in enumerate(pts) if key != "psnr" or r["ref"] == main_ref]
        front = [keep[k] for k in frontier([xs[k] for k in keep], [ys[k] for k in keep], lower)]
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "k--", lw=1, zorder=2, label="frontier")
        ax.set_xlabel("measured time per image (ms)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    fig.legend(uniq.values(), uniq.keys(), loc="upper center", ncol=min(6, len(uniq)), fontsize=8)
    c = context
    fig.suptitle(
        f"{c['model']} on {c['device_name']} ({c['device']}, {c['dtype']}, batch {c['time_batch']}, "
        f"{c['time_threads']} threads); circles: {tab[0]['solver']}, squares: other solver, stars: ILF",
        y=0.012,
        fontsize=8,
    )
    ilf_lines = [s for s in summary if s.startswith("ilf ")]
    fig.text(0.5, 0.045, "\n".join(ilf_lines)[:900], ha="center", va="bottom", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.15, 1, 0.92))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_side_by_side(
    panels: list[dict[str, Any]], out: str | Path, per_class: int, row_labels: list[str] | None = None
) -> Path:
    """Panels side by side, each a grid with one row per class (or prompt), titled with its time and
    speed-up; ``row_labels`` (prompts) are written left of the first panel, one per row."""
    from PIL import Image, ImageDraw

    from ilf_runtime.images import make_grid

    arrs = []
    for p in panels:
        g = make_grid(p["images"].float().clamp(0, 1), per_class, min_cell=48)
        arrs.append((g * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    h = max(a.shape[0] for a in arrs)
    gap, top = 16, 30
    left = 6 * max(len(t) for t in row_labels) + 8 if row_labels else 0
    widths = [max(a.shape[1], 6 * len(p["title"]) + 4) for p, a in zip(panels, arrs)]  # room for the title
    width = left + sum(widths) + gap * (len(arrs) - 1)
    mode = "L" if arrs[0].shape[2] == 1 else "RGB"
    ink = 0 if mode == "L" else (0, 0, 0)
    canvas = Image.new(mode, (width, h + top), color=255 if mode == "L" else (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if row_labels:
        cell = h / len(row_labels)  # make_grid: one row per label, equal heights
        for i, t in enumerate(row_labels):
            draw.text((2, top + int((i + 0.5) * cell) - 5), t, fill=ink)
    x = left
    for p, a, w in zip(panels, arrs, widths):
        img = Image.fromarray(a[:, :, 0] if mode == "L" else a[:, :, :3])
        canvas.paste(img, (x, top))
        draw.text((x + 2, 2), p["title"], fill=ink)
        draw.text((x + 2, 15), f"{p['seconds']:.2f} s, {p['speedup']:.2f}x", fill=ink)
        x += w + gap
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
