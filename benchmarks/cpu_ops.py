"""CPU timing of the compiled ``torch.ops.ilf`` kernels against their eager references.

Both are timed in the same run, alternating, with torch.utils.benchmark (blocked_autorange after
a warm-up); each number is the median over rounds of the per-round medians, and the comparison is
the ratio eager / ext. Writes benchmarks/results/cpu_ops.json and .md; the ``_PREFER_EXT`` table in
ilf_runtime/ops.py is set from the "prefer ext" lines of the Markdown file.

    python benchmarks/cpu_ops.py              # torch's default thread count
    python benchmarks/cpu_ops.py --threads 1 --quick
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
from pathlib import Path

import torch
from torch.utils import benchmark

from ilf_runtime import ops
from ilf_runtime.bench.report import cpu_name
from ilf_runtime.ext import ext_status

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# (B, T, D): this project's small DiTs (16 px, patch 2 -> T = 64; width 128 / 256), DiT-S/2 and
# DiT-XL/2 at 256 px (T = 256, D = 384 / 1152).
SIZES = [(64, 64, 128), (64, 64, 256), (16, 256, 384), (32, 256, 1152)]
DTYPES = [torch.float32, torch.bfloat16]
WIN = 1.05  # a row "wins" when the kernel is at least 5% faster
EPS = 1e-6


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], check=False, cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "no commit"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def cases(sizes):
    """(op, variant, dtype, shape, eager callable, ext callable)."""
    g = torch.Generator().manual_seed(0)
    for b, t, d in sizes:
        for dtype in DTYPES:
            h = torch.randn(b, t, d, generator=g).to(dtype)
            f = torch.randn(b, t, d, generator=g).to(dtype)
            for variant, s in (
                ("s=()", torch.tensor(0.3, dtype=dtype)),
                ("s=(D,)", torch.randn(d, generator=g).to(dtype)),
            ):
                yield ("feedback_inject", variant, dtype, (b, t, d),
                       lambda h=h, f=f, s=s: ops.feedback_inject_ref(h, f, s),
                       lambda h=h, f=f, s=s: torch.ops.ilf.feedback_inject(h, f, s))  # fmt: skip
            for variant, mshape in (("mod=(B,D)", (b, d)), ("mod=(B,1,D)", (b, 1, d))):
                shift = torch.randn(mshape, generator=g).to(dtype)
                scale = torch.randn(mshape, generator=g).to(dtype)
                yield ("ada_layernorm", variant, dtype, (b, t, d),
                       lambda x=h, sh=shift, sc=scale: ops.ada_layernorm_ref(x, sh, sc, EPS),
                       lambda x=h, sh=shift, sc=scale: torch.ops.ilf.ada_layernorm(x, sh, sc, EPS))  # fmt: skip


def time_us(fn, min_run_time: float) -> float:
    return (
        benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median
        * 1e6
    )


def run(sizes, rounds: int, min_run_time: float) -> list[dict]:
    rows = []
    for op, variant, dtype, shape, eager, ext in cases(sizes):
        for fn in (eager, ext):  # warm-up: allocator, page faults, OpenMP pool
            for _ in range(3):
                fn()
        e_us, x_us = [], []
        for _ in range(rounds):  # alternate so that drifts hit both
            e_us.append(time_us(eager, min_run_time))
            x_us.append(time_us(ext, min_run_time))
        e, x = statistics.median(e_us), statistics.median(x_us)
        row = {
            "op": op,
            "variant": variant,
            "dtype": str(dtype).removeprefix("torch."),
            "shape": list(shape),
            "eager_us": round(e, 1),
            "ext_us": round(x, 1),
            "speedup": round(e / x, 3),
            "wins": e / x >= WIN,
        }
        rows.append(row)
        print(
            f"{op:16s} {row['dtype']:9s} {shape!s:18s} {variant:12s} eager {e:9.1f} us  ext {x:9.1f} us  x{e / x:.2f}"
        )
    return rows


def decide(rows: list[dict]) -> dict[str, dict]:
    """Per (op, dtype): prefer the kernel when it wins on the geometric mean and loses nowhere by >5%."""
    out = {}
    for key in sorted({(r["op"], r["dtype"]) for r in rows}):
        sp = [r["speedup"] for r in rows if (r["op"], r["dtype"]) == key]
        gmean = math.exp(sum(map(math.log, sp)) / len(sp))
        out[f"{key[0]}/{key[1]}"] = {
            "geomean_speedup": round(gmean, 3),
            "min_speedup": min(sp),
            "prefer_ext": gmean >= WIN and min(sp) >= 1 / WIN,
        }
    return out


def write(context: dict, rows: list[dict], decisions: dict, stem: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(
        json.dumps({"context": context, "rows": rows, "decisions": decisions}, indent=1) + "\n"
    )
    lines = [
        "# CPU: compiled ilf ops vs eager references",
        "",
        "Generated by `python benchmarks/cpu_ops.py`. "
        + ", ".join(f"{k}: {v}" for k, v in context.items())
        + ".",
        "",
        (
            "Median of per-round medians (torch.utils.benchmark, blocked_autorange), eager and ext "
            f"alternating in one run; speed-up = eager / ext; a row wins at >= {WIN}x."
        ),
        "",
        "| op | dtype | (B, T, D) | variant | eager us | ext us | speed-up | wins? |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['dtype']} | {tuple(r['shape'])} | {r['variant']} | {r['eager_us']:.1f} | "
            f"{r['ext_us']:.1f} | {r['speedup']:.2f} | {'yes' if r['wins'] else 'no'} |"
        )
    lines += [
        "",
        (
            f"Decision per op and dtype (prefer ext when the geometric-mean speed-up is >= {WIN} and no "
            f"row is slower than 1/{WIN}); these set `_PREFER_EXT` in ilf_runtime/ops.py:"
        ),
        "",
        "| op / dtype | geomean speed-up | min speed-up | prefer ext |",
        "|---|---:|---:|---|",
    ]
    for k, v in decisions.items():
        lines.append(f"| {k} | {v['geomean_speedup']:.2f} | {v['min_speedup']:.2f} | {v['prefer_ext']} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(args: argparse.Namespace) -> None:
    st = ext_status()
    if not st["loaded"]:
        raise SystemExit(f"ilf_runtime._C is not loaded ({st['reason']}); build it first")
    if args.threads:
        torch.set_num_threads(args.threads)
    context = {
        "device": "cpu",
        "cpu": cpu_name(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
    }
    print(json.dumps(context))
    sizes = SIZES[:2] if args.quick else SIZES
    rows = run(sizes, args.rounds, args.min_run_time)
    decisions = decide(rows)
    for k, v in decisions.items():
        print(f"{k}: {v}")
    write(context, rows, decisions, args.out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--rounds", type=int, default=3, help="alternating eager/ext rounds per case")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds per blocked_autorange")
    p.add_argument("--quick", action="store_true", help="only the two smallest sizes")
    p.add_argument("--out", default="cpu_ops", help="file stem under benchmarks/results/")
    main(p.parse_args())
