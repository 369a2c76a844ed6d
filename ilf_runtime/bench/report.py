"""The report of an `ilf bench` run: its context (device, versions, commit), the table and the
equal-cost summary, written as STEM.csv, STEM.json, STEM.md and STEM_pareto.png (`write_all`) and read
back for ``--report-only`` (`load_result`)."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ilf_runtime.bench.plan import Row, row_label
from ilf_runtime.bench.plots import pareto_plot
from ilf_runtime.weights import save_file_atomic

__all__ = [
    "COLUMNS",
    "COST_TOLERANCE",
    "CSV_CONTEXT",
    "context",
    "cpu_name",
    "git",
    "load_result",
    "markdown_table",
    "print_side_by_side",
    "provenance",
    "summarize",
    "summarize_evals",
    "table",
    "write_all",
]

COST_TOLERANCE = 0.05  # "at ILF's cost": measured time within 5%
COLUMNS = [
    "method",
    "setting",
    "solver",
    "steps",
    "loop_steps",
    "weights",
    "block_evals_per_image",
    "time_per_image_s",
    "time_min_s",
    "time_max_s",
    "speedup",
    "fid",
    "fid_subset_mean",
    "fid_subset_std",
    "fid_floor",
    "class_accuracy",
    "psnr",
    "psnr_se",
    "ref",
    "peak_mem_mb",
    "n",
]


# text-to-image demo rows (`fashion.prompt_metric`): in the table, CSV and markdown only when measured
PROMPT_COLUMNS = ["colour_accuracy", "prompt_accuracy", "prompt_accuracy_se"]


def columns(result: dict[str, Any]) -> list[str]:
    """The table's columns: `COLUMNS`, plus `PROMPT_COLUMNS` after class accuracy when a row has them."""
    if not any("prompt_accuracy" in x for x in result["results"]):
        return list(COLUMNS)
    i = COLUMNS.index("class_accuracy") + 1
    return COLUMNS[:i] + PROMPT_COLUMNS + COLUMNS[i:]


CSV_CONTEXT = (
    "device",
    "dtype",
    "time_batch",
    "time_threads",
    "quality_batch",
    "torch",
    "diffusers",
    "git_commit",
)


def git(*args: str) -> str | None:
    """The output of ``git ARGS`` in this checkout, or None (no git, not a checkout)."""
    root = Path(__file__).resolve().parents[2]
    try:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict[str, Any]:
    """The code a run starts with: taken before sampling, so that a commit made while a long run is
    going does not end up in its record."""
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def context(
    model: Any, a: Any, info: Any, n: int, time_batch: int, fid: str, started: dict[str, Any]
) -> dict[str, Any]:
    """Everything a row's numbers depend on besides the row itself (`fid`: what the FID column
    measures, or why it is empty; `started`: `provenance()`)."""
    import diffusers

    dev = model.device
    return {
        "model": a.model,
        "model_kind": model.adapter.name,
        "num_blocks": len(model.transformer.transformer_blocks),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "dtype": a.dtype,
        "guidance": a.guidance if a.guidance is not None else model.guidance,
        "quality_images": n,
        "seeds": [a.seed, a.seed + n - 1],
        "quality_batch": a.batch_size,
        "quality_processes": info.world_size,
        "time_batch": time_batch,
        "timing": f"rank 0 alone; warm-up pass, then median of {a.repeats} interleaved passes (order rotated)",
        "time_threads": torch.get_num_threads(),
        "peak_memory": "CUDA max allocated" if dev.type == "cuda" else "process RSS (polled every 2 ms)",
        "fid": fid,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        **started,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "args": asdict(a),
    }


def table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat dict per row (the CSV / JSON rows), with the speed-up against the reference row."""
    rows, res = result["rows"], result["results"]
    ref_steps = result["context"]["args"]["ref_steps"]
    ref_time = {
        r.solver: x["time_per_image_s"] for r, x in zip(rows, res) if r.is_ref and r.steps == ref_steps
    }
    first = next(iter(ref_time.values()))
    cols = columns(result)
    out = []
    for r, x in zip(rows, res):
        d = {"method": r.method, "setting": r.setting, "solver": r.solver, "steps": r.steps}
        d |= {"loop_steps": r.loop_steps, "weights": r.weights and Path(r.weights).name}
        d |= {k: v for k, v in x.items() if k != "per_image_psnr"}
        d["speedup"] = ref_time.get(r.solver, first) / x["time_per_image_s"]
        if r.is_ref and r.steps == ref_steps:
            d["ref"] = "self"
        out.append({k: d.get(k) for k in cols})
    return out


def _competitors(tab: list[dict[str, Any]], i: int) -> list[int]:
    t = tab[i]["time_per_image_s"]
    return [
        j
        for j, r in enumerate(tab)
        if not r["method"].startswith("ilf") and abs(r["time_per_image_s"] - t) <= COST_TOLERANCE * t
    ]


def _name(r: dict[str, Any]) -> str:
    return row_label(r["method"], r["setting"], r["solver"], r["steps"])


def _helps(tab: list[dict[str, Any]], i: int) -> str:
    """For an ILF + cache row: is it on the time-PSNR frontier, i.e. does no other row (against the
    same reference images) run at most as long with at least its PSNR?"""
    r = tab[i]
    dom = [
        q
        for k, q in enumerate(tab)
        if k != i and q["ref"] != "self" and q["ref"] == r["ref"]
        and q["time_per_image_s"] <= r["time_per_image_s"] and q["psnr"] >= r["psnr"]
    ]  # fmt: skip
    if not dom:
        return " Combining helps: yes, no other row is as fast with as high a PSNR."
    best = max(dom, key=lambda q: q["psnr"])
    return f" Combining helps: no, {_name(best)} is at least as fast with a PSNR of {best['psnr']:.2f} dB."


def _paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the per-image differences a - b."""
    d = a - b
    return float(d.mean()), float(d.std(unbiased=True) / math.sqrt(d.numel()))


def _others(tab: list[dict[str, Any]], i: int) -> list[int]:
    """Rows other than ILF's measured against the same reference images as row `i`."""
    r = tab[i]
    return [
        j
        for j, q in enumerate(tab)
        if not q["method"].startswith("ilf") and q["ref"] != "self" and q["ref"] == r["ref"]
    ]


def _rivals(tab: list[dict[str, Any]], i: int, lo: float, hi: float) -> list[int]:
    """`_others` whose time is in (lo, hi] times row `i`'s."""
    t = tab[i]["time_per_image_s"]
    return [j for j in _others(tab, i) if lo < tab[j]["time_per_image_s"] / t <= hi]


def _verdict(margin: float, se: float, k: int) -> str:
    """ILF's paired margin over a competitor, judged at `k` standard errors."""
    if margin > k * se:
        return f"ILF ahead by more than {k} SE"
    if margin < -k * se:
        return f"the competitor is ahead by more than {k} SE"
    return f"within {k} SE"


def _dominated(tab: list[dict[str, Any]], res: list[dict[str, Any]], i: int) -> str:
    """Competitors outside the 5% band that run faster than the ILF row and still reach a higher PSNR
    (the band alone would not show them)."""
    r = tab[i]
    faster = [j for j in _rivals(tab, i, 0.0, 1 - COST_TOLERANCE) if tab[j]["psnr"] > r["psnr"]]
    if not faster:
        return " No faster competitor has a higher PSNR."
    j = max(faster, key=lambda k: tab[k]["psnr"])
    margin, se = _paired(res[j]["per_image_psnr"], res[i]["per_image_psnr"])
    return (
        f" Faster and higher PSNR: {_name(tab[j])} ({1000 * tab[j]['time_per_image_s']:.2f} ms/image, "
        f"{tab[j]['psnr']:.2f} dB, {margin:+.2f} ± {se:.2f} dB over ILF)."
    )


def _just_slower(tab: list[dict[str, Any]], res: list[dict[str, Any]], i: int) -> str:
    """The best competitor (same reference) 5-10% slower than the ILF row, named when ILF is not ahead
    of it by more than 2 SE: a band edge of 5% is close to what one timing run can resolve."""
    r, t = tab[i], tab[i]["time_per_image_s"]
    near = _rivals(tab, i, 1 + COST_TOLERANCE, 1 + 2 * COST_TOLERANCE)
    if not near:
        return ""
    j = max(near, key=lambda k: tab[k]["psnr"])
    margin, se = _paired(res[i]["per_image_psnr"], res[j]["per_image_psnr"])
    if margin > 2 * se:
        return ""
    q = tab[j]
    verdict = "the competitor is ahead by more than 2 SE" if margin < -2 * se else "within 2 SE: level"
    return (
        f" Just past the band ({COST_TOLERANCE:.0%}-{2 * COST_TOLERANCE:.0%} slower): {_name(q)} "
        f"({1000 * q['time_per_image_s']:.2f} ms/image, {q['time_per_image_s'] / t - 1:+.1%} time): "
        f"PSNR {r['psnr']:.2f} vs {q['psnr']:.2f} dB, margin {margin:+.2f} ± {se:.2f} dB: {verdict}."
    )


def summarize(result: dict[str, Any]) -> list[str]:
    """Per ILF row (and ILF + cache row): the best competitor at its cost and the margins."""
    tab, res = table(result), result["results"]
    lines = []
    for i, r in enumerate(tab):
        if not r["method"].startswith("ilf"):
            continue
        line = (
            f"{_name(r)}: {1000 * r['time_per_image_s']:.2f} ms/image, {r['speedup']:.2f}x vs plain "
            f"{result['context']['args']['ref_steps']} steps"
        )
        comp = _competitors(tab, i)
        # PSNR is only comparable between rows measured against the same reference images (the
        # 20-step output of the same solver); FID is against the data, so every row competes on it
        same = [j for j in comp if tab[j]["ref"] == r["ref"]]
        if not comp:
            line += f"; no competitor within {COST_TOLERANCE:.0%} of its time."
        elif not same:
            line += f"; no competitor against {r['ref']} within {COST_TOLERANCE:.0%} of its time."
        else:
            j = max(same, key=lambda k: tab[k]["psnr"])
            c = tab[j]
            margin, se = _paired(res[i]["per_image_psnr"], res[j]["per_image_psnr"])
            verdict = _verdict(margin, se, 2)
            if verdict == "within 2 SE":
                verdict += ": no clear winner"
            line += (
                f"; best competitor at this cost (±{COST_TOLERANCE:.0%}, PSNR against {r['ref']}): {_name(c)} "
                f"({1000 * c['time_per_image_s']:.2f} ms/image): PSNR {r['psnr']:.2f} vs {c['psnr']:.2f} dB, "
                f"margin {margin:+.2f} ± {se:.2f} dB (paired SE): {verdict}."
            )
        if comp and r.get("fid") is not None:
            better = [
                q
                for q in (tab[k] for k in comp)
                if q["fid"] < r["fid"] - max(q["fid_subset_std"], r["fid_subset_std"])
            ]
            line += (
                " FID: better beyond the subset spread for "
                + ", ".join(f"{_name(b)} ({b['fid']:.3f})" for b in better)
                + f" than ILF's {r['fid']:.3f} ± {r['fid_subset_std']:.3f}."
                if better
                else f" FID: no competitor at this cost is better beyond the subset spread "
                f"({r['fid']:.3f} ± {r['fid_subset_std']:.3f})."
            )
        line += _dominated(tab, res, i) + _just_slower(tab, res, i)
        if r["method"] != "ilf":
            line += _helps(tab, i)
        lines.append(line)
    return lines


def summarize_evals(result: dict[str, Any]) -> list[str]:
    """Per ILF row (and ILF + cache row): the best other row that spends at most as many block
    evaluations per image (the cost on an accelerator, where time follows the evaluations), PSNR
    against the same reference images, and the paired margin."""
    tab, res = table(result), result["results"]
    lines = []
    for i, r in enumerate(tab):
        if not r["method"].startswith("ilf"):
            continue
        evals = r["block_evals_per_image"]
        line = f"{_name(r)}: {evals:.0f} block evaluations per image"
        rivals = [j for j in _others(tab, i) if tab[j]["block_evals_per_image"] <= evals + 1e-9]
        if not rivals:
            lines.append(line + f"; no other row against {r['ref']} spends as few.")
            continue
        j = max(rivals, key=lambda k: tab[k]["psnr"])
        q = tab[j]
        margin, se = _paired(res[i]["per_image_psnr"], res[j]["per_image_psnr"])
        verdict = _verdict(margin, se, 3)
        lines.append(
            line + f"; best row at most as dear: {_name(q)} ({q['block_evals_per_image']:.0f}): PSNR "
            f"{r['psnr']:.2f} vs {q['psnr']:.2f} dB, margin {margin:+.2f} ± {se:.2f} dB (paired SE): {verdict}."
        )
    return lines


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(result: dict[str, Any]) -> str:
    """The results table of STEM.md."""
    prompts = "prompt_accuracy" in columns(result)
    extra = " colour acc | full-prompt acc ± SE |" if prompts else ""
    head = (
        "| method | setting | solver | steps | block evals / image | time / image (ms) [min-max] | speed-up | "
        f"FID (subset mean ± std) | FID floor | class acc |{extra} PSNR vs ref (dB) ± SE | peak mem (MiB) |\n"
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if prompts else "") + "---|---|"
    )
    lines = [head]
    for r in table(result):
        fid = (
            "-"
            if r["fid"] is None
            else f"{r['fid']:.3f} ({r['fid_subset_mean']:.2f} ± {r['fid_subset_std']:.2f})"
        )
        acc = "-" if r["class_accuracy"] is None else f"{100 * r['class_accuracy']:.1f}%"
        if prompts:
            full = _fmt(r["prompt_accuracy"] and 100 * r["prompt_accuracy"], ".1f")
            acc += f" | {_fmt(r['colour_accuracy'] and 100 * r['colour_accuracy'], '.1f')}% | {full} ± "
            acc += f"{_fmt(r['prompt_accuracy_se'] and 100 * r['prompt_accuracy_se'], '.1f')}%"
        psnr = "ref" if r["ref"] == "self" else f"{r['psnr']:.2f} ± {r['psnr_se']:.2f}"
        t = f"{1000 * r['time_per_image_s']:.2f} [{1000 * r['time_min_s']:.2f}-{1000 * r['time_max_s']:.2f}]"
        lines.append(
            f"| {r['method']} | {r['setting'] or '-'} | {r['solver']} | {r['steps']} | "
            f"{r['block_evals_per_image']:g} | {t} | {r['speedup']:.2f}x | {fid} | {_fmt(r['fid_floor'], '.3f')} | "
            f"{acc} | {psnr} | {r['peak_mem_mb']:.0f} |"
        )
    return "\n".join(lines)


def load_result(stem: str | Path) -> dict[str, Any]:
    """The ``{"context", "rows", "results"}`` of a finished run, read back from STEM.json and
    STEM_per_image.safetensors (as `write_all` wrote them)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    stem = Path(stem)
    jpath, ppath = stem.with_suffix(".json"), stem.parent / f"{stem.name}_per_image.safetensors"
    for q in (jpath, ppath):
        if not q.is_file():
            raise FileNotFoundError(
                f"{q}: not found; expected the output of a finished `ilf bench --out {stem}`"
            )
    d = json.loads(jpath.read_text())
    if "row_specs" not in d or len(d["row_specs"]) != len(d.get("rows", [])):
        raise ValueError(f"{jpath}: expected 'rows' and 'row_specs' of equal length (written by `ilf bench`)")
    try:
        per = load_file(str(ppath))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{ppath}: not a readable safetensors file ({e})") from None
    rows, results = [], []
    for i, (spec, tab_row) in enumerate(zip(d["row_specs"], d["rows"])):
        key = f"row_{i:03d}"
        if key not in per:
            raise ValueError(f"{ppath}: expected tensor {key!r} for row {i}; the file does not match {jpath}")
        spec["cache"] = tuple(spec["cache"]) if spec.get("cache") else None
        rows.append(Row(**spec))
        x = {
            k: v
            for k, v in tab_row.items()
            if k not in ("method", "setting", "solver", "steps", "loop_steps", "weights", "speedup")
        }
        if x.get("ref") == "self":
            x["ref"] = f"plain {spec['solver']} {d['context']['args']['ref_steps']}"
        x["per_image_psnr"] = per[key]
        results.append(x)
    return {"context": d["context"], "rows": rows, "results": results}


def write_all(result: dict[str, Any], stem: str | Path) -> list[Path]:
    """STEM.csv, STEM.json, STEM.md and STEM_pareto.png; adds the summary to `result`."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    result["summary"] = summarize(result)
    result["summary_evals"] = summarize_evals(result)
    tab = table(result)
    paths = [stem.with_suffix(".csv"), stem.with_suffix(".json"), stem.with_suffix(".md")]
    c = result["context"]
    ctx = {k: c[k] for k in CSV_CONTEXT}  # every CSV row carries what its numbers depend on
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns(result) + list(CSV_CONTEXT))
        w.writeheader()
        w.writerows(r | ctx for r in tab)
    specs = [r.spec() for r in result["rows"]]
    paths[1].write_text(
        json.dumps(
            {
                "context": result["context"],
                "rows": tab,
                "row_specs": specs,
                "summary": result["summary"],
                "summary_evals": result["summary_evals"],
            },
            indent=1,
            default=str,
        )
    )
    # the per-image PSNR of every row, so that the report can be rebuilt (``--report-only``) with the
    # paired standard errors, which need the values image by image
    save_file_atomic(
        {f"row_{i:03d}": x["per_image_psnr"].contiguous() for i, x in enumerate(result["results"])},
        stem.parent / f"{stem.name}_per_image.safetensors",
        metadata={
            "what": "per-image paired PSNR (dB) of each row against its reference, row order of STEM.json"
        },
    )
    md = [
        f"# ILF against fewer steps and caching: {c['model']}",
        "",
        (
            f"{c['quality_images']} images per row (seeds {c['seeds'][0]}..{c['seeds'][1]}), guidance {c['guidance']}, "
            f"{c['dtype']} on {c['device_name']} ({c['device']}); timing: batch {c['time_batch']}, {c['timing']}, "
            f"{c['time_threads']} threads. PSNR: paired, against the plain {c['args']['ref_steps']}-step images of the "
            f"same solver from the same noise (SE of the mean). FID: {c['fid']}. torch {c['torch']}, diffusers "
            f"{c['diffusers']}, commit {str(c['git_commit'])[:12]}{' (dirty)' if c['git_dirty'] else ''}, {c['date']}."
            + (
                " Every row runs the fused block forward (`ilf_runtime.fused`)."
                if c["args"].get("fused")
                else ""
            )
        ),
        "",
        markdown_table(result),
        "",
        *[f"Note: {x}." for x in c.get("notes", [])],
        "",
        "## Equal-cost summary",
        "",
        *[f"- {s}" for s in result["summary"]],
        "",
        "## Equal-evaluations summary",
        "",
        (
            "Against every other row that spends at most as many block evaluations per image (on a GPU the "
            "evaluations, not this CPU's Python overheads, set the time):"
        ),
        "",
        *[f"- {s}" for s in result["summary_evals"]],
        "",
        (
            "Notes: block evaluations are counted as they run (attention and MLP of each block an equal share; "
            "the feedback block counts as a block). First-Block-Cache and MagCache decide on the host every step "
            "(`.item()`), so they cannot run inside a captured CUDA graph; every row here runs eagerly."
        ),
        "",
    ]
    paths[2].write_text("\n".join(md))
    pareto = stem.parent / f"{stem.name}_pareto.png"
    paths.append(pareto_plot(tab, c, result["summary"], pareto, COST_TOLERANCE))
    return paths


# what the FID column measures: class-conditional rows (`run.quality`), text-to-image rows (`run.prompt_quality`)
FID_CLASSES = "shipped Fashion-MNIST classifier features vs the test split; floor: train split, same n"
FID_PROMPTS = (
    "shipped Fashion-MNIST classifier features of the garments' intensity (max over RGB) vs the test split; "
    "floor: train split, same n"
)


def print_side_by_side(r: dict[str, Any]) -> None:
    """Prints what `run.side_by_side` returns: the grid's path, each panel's time (median and range
    over its passes) and cost, the context, and a warning when the machine was busy."""
    c = r["context"]
    print(f"wrote {r['out']} (same noise and labels in every panel)")
    print(
        f"  {c['images']} images per panel on {c['device']}, {c['dtype']}, {c['threads']} threads; "
        f"times: median [min-max] of {r['panels'][0]['passes']} interleaved passes after a warm-up"
    )
    for p in r["panels"]:
        print(
            f"  {p['title']}: {p['seconds']:.3f} s [{p['seconds_min']:.3f}-{p['seconds_max']:.3f}], "
            f"{p['block_evals_per_image']:g} block evaluations per image, "
            f"speed-up {p['speedup']:.2f}x vs {r['panels'][0]['title']}"
        )
    if c.get("busy"):
        print(f"  WARNING: {c['busy']}")
