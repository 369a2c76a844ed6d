"""The comparison harness (`ilf bench`, benchmarks/compare.py) end to end on a tiny model, sharded
evaluation under torchrun against one process, and the equal-cost summary on made-up rows."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_dit

from ilf_runtime import ILFConfig, apply_ilf, save_ilf_weights
from ilf_runtime.bench import DEFAULT_SHIPPED, BenchArgs, Row, default_rows, weights_files
from ilf_runtime.bench.plots import frontier
from ilf_runtime.bench.report import summarize, summarize_evals
from ilf_runtime.cli import main

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 4


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A saved 10-class 1-channel tiny DiT (so FID and class accuracy apply) and ILF weights for it."""
    d = tmp_path_factory.mktemp("bench")
    model = tiny_dit(num_layers=LAYERS, in_channels=1, learned_sigma=False)
    model.save_pretrained(d / "model")
    loop = apply_ilf(model, ILFConfig(loop_start=1, loop_end=2, loop_steps="last:2"))
    with torch.no_grad():
        loop.scales.fill_(0.05)
    w = save_ilf_weights(
        d / "fb.safetensors", model, sampler={"num_steps": 4, "solver": "ddim", "loop_steps": "last:2"}
    )
    return d, str(d / "model"), str(w)


def _common(model_dir: str) -> list[str]:
    return [
        "--model", model_dir, "--solvers", "ddim", "--plain-steps", "3,4", "--ref-steps", "6",
        "--cache-steps", "6", "--per-class", "2", "--subsets", "2", "--batch-size", "4",
        "--time-batch", "2", "--repeats", "1", "--no-progress",
    ]  # fmt: skip


def test_harness_end_to_end_writes_every_file(tiny_setup, capsys, monkeypatch):
    d, model_dir, weights = tiny_setup
    # the commit is recorded as it was when the run started, not when it ended
    from ilf_runtime.bench import report as bench_report
    from ilf_runtime.bench import run as bench_run

    real_git, real_time_rows, timing = bench_report.git, bench_run.time_rows, []

    def time_rows(*args, **kw):
        timing.append(True)
        return real_time_rows(*args, **kw)

    monkeypatch.setattr(bench_run, "time_rows", time_rows)
    monkeypatch.setattr(
        bench_report, "git", lambda *a: "a commit made during the run" if timing else real_git(*a)
    )
    out = d / "cmp"
    args = ["bench", *_common(model_dir), "--weights", weights, "--methods", "plain,ilf,fora"]
    assert main([*args, "--sweep", "fora=2", "--grid-per-class", "1", "--out", str(out)]) == 0
    for suffix in (".csv", ".json", ".md", "_pareto.png", "_grid.png"):
        assert (d / f"cmp{suffix}").stat().st_size > 0, suffix
    with open(d / "cmp.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], int(r["steps"])) for r in rows] == [
        ("plain", 6), ("plain", 4), ("plain", 3), ("ilf", 4), ("fora", 6)
    ]  # fmt: skip
    evals = [float(r["block_evals_per_image"]) for r in rows]
    ilf_evals = ILFConfig(loop_start=1, loop_end=2).block_evals(LAYERS, 4, "last:2")
    assert evals == [6 * LAYERS, 4 * LAYERS, 3 * LAYERS, ilf_evals, 3 * LAYERS]  # FORA N=2: half of 6 steps
    assert float(rows[0]["speedup"]) == 1.0 and rows[0]["ref"] == "self"
    assert {r["device"] for r in rows} == {"cpu"} and all(r["git_commit"] and r["torch"] for r in rows)
    assert all(float(r["time_per_image_s"]) > 0 and float(r["peak_mem_mb"]) > 0 for r in rows)
    # PSNR against the 6-step reference, re-computed here from images sampled with the same labels
    # (classes interleaved, 2 per class), seeds and sampler
    from ilf_runtime import sample
    from ilf_runtime.registry import load_model

    m = load_model(model_dir)
    kw = {"class_labels": list(range(10)) * 2, "seeds": range(20), "solver": "ddim"}
    ref = sample(m, num_steps=6, **kw).images.double()
    for row, extra in zip(rows[1:4], [{"num_steps": 4}, {"num_steps": 3}, {"num_steps": 4, "ilf": weights}]):
        mse = (sample(m, **kw, **extra).images.double() - ref).square().flatten(1).mean(1)
        psnr = [10 * torch.log10(1 / e).item() if e > 0 else 100.0 for e in mse]  # identical: 100 dB
        want = sum(psnr) / len(psnr)
        assert float(row["psnr"]) == pytest.approx(want, rel=1e-4), (row["method"], row["steps"])
    report = json.loads((d / "cmp.json").read_text())
    ctx = report["context"]
    for key in (
        "device",
        "dtype",
        "time_batch",
        "time_threads",
        "torch",
        "diffusers",
        "git_commit",
        "quality_batch",
    ):
        assert ctx[key] is not None, key
    assert ctx["quality_images"] == 20 and report["summary"][0].startswith("ilf fb loop last:2 ddim 4 steps")
    assert ctx["git_commit"] != "a commit made during the run" and ctx["started"] <= ctx["date"]
    md = (d / "cmp.md").read_text()
    assert "| fora | N=2 |" in md and "Equal-cost summary" in md
    printed = capsys.readouterr().out
    assert "ILF 4 steps" in printed and "speed-up" in printed

    # --report-only rebuilds the same report from the saved files, sampling nothing
    (d / "cmp.md").unlink()
    (d / "cmp_pareto.png").unlink()
    assert main(["bench", "--report-only", "--out", str(out)]) == 0
    assert (d / "cmp.md").read_text() == md and (d / "cmp_pareto.png").stat().st_size > 0
    assert json.loads((d / "cmp.json").read_text())["summary"] == report["summary"]


def _report_only_error(stem: Path, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(["bench", "--report-only", "--out", str(stem)])
    assert e.value.code == 2
    return capsys.readouterr().err


def test_report_only_names_missing_or_mismatched_files(tiny_setup, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    _, model_dir, _ = tiny_setup
    stem = tmp_path / "cmp"
    assert "cmp.json: not found" in _report_only_error(stem, capsys)
    args = ["bench", *_common(model_dir), "--methods", "plain", "--grid-per-class", "0", "--out", str(stem)]
    assert main(args) == 0
    per = load_file(str(tmp_path / "cmp_per_image.safetensors"))
    assert sorted(per) == ["row_000", "row_001", "row_002"] and per["row_001"].shape == (20,)
    per.pop("row_002")
    save_file(per, str(tmp_path / "cmp_per_image.safetensors"))
    assert "expected tensor 'row_002'" in _report_only_error(stem, capsys)
    (tmp_path / "cmp_per_image.safetensors").write_bytes(b"not safetensors")
    assert "not a readable safetensors file" in _report_only_error(stem, capsys)


def test_default_rows_cover_the_issue(tiny_setup):
    _, _, weights = tiny_setup
    rows = default_rows(BenchArgs(), [weights])
    labels = {(r.method, r.solver, r.steps) for r in rows}
    for solver in ("ddim", "dpmpp_2m"):
        assert {("plain", solver, n) for n in (8, 9, 10, 11, 12, 13, 14, 15, 16, 20)} <= labels
    assert rows[0].is_ref and rows[1].is_ref and rows[0].steps == 20
    methods = {r.method for r in rows}
    assert {
        "ilf",
        "fora",
        "delta-dit",
        "inner-reuse",
        "first-block-cache",
        "taylorseer",
        "magcache",
    } <= methods
    assert {"ilf+fora", "ilf+inner-reuse"} <= methods
    assert sum(r.method == "magcache" for r in rows) >= 3  # thresholds swept
    with pytest.raises(ValueError, match="unknown methods"):
        BenchArgs(methods="plain,teacache")
    # the bundled model's shipped weights are used when present, and each absent one gets a note
    from ilf_runtime.registry import ASSETS, SHIPPED_WEIGHTS

    shipped = [ASSETS / "fashion-dit" / SHIPPED_WEIGHTS["fashion-dit"][k] for k in DEFAULT_SHIPPED]
    files, notes = weights_files(BenchArgs())
    assert files == [str(p) for p in shipped if p.is_file()]
    assert len(notes) == sum(not p.is_file() for p in shipped)
    assert weights_files(BenchArgs(weights=[weights])) == ([weights], [])
    # shipped[:NAME] names a built-in model's own files, as in `ilf sample --weights`
    assert weights_files(BenchArgs(weights=["shipped:aggressive"])) == ([str(shipped[1])], [])
    with pytest.raises(FileNotFoundError, match="weights 'shipped:nope'"):
        weights_files(BenchArgs(weights=["shipped:nope"]))
    with pytest.raises(ValueError, match="fora setting"):
        default_rows(BenchArgs(methods="fora", sweep=["fora=x"]), [])


def test_weights_of_another_solver_make_it_the_main_one(tmp_path):
    model = tiny_dit(num_layers=LAYERS, in_channels=1, learned_sigma=False)
    apply_ilf(model, ILFConfig(loop_start=1, loop_end=2, loop_steps="last:2"))
    w = save_ilf_weights(
        tmp_path / "fb.safetensors",
        model,
        sampler={"num_steps": 4, "solver": "dpmpp_2m", "loop_steps": "all"},
    )
    rows = default_rows(BenchArgs(solvers="ddim,dpmpp_2m", methods="plain,ilf,fora"), [str(w)])
    assert [(r.solver, r.steps) for r in rows[:2]] == [("dpmpp_2m", 20), ("ddim", 20)]
    assert {r.solver for r in rows if r.method in ("ilf", "fora")} == {"dpmpp_2m"}


@pytest.mark.distributed
@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed gloo missing"
)
def test_sharded_quality_equals_one_process(tiny_setup):
    d, model_dir, _ = tiny_setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = [*_common(model_dir), "--methods", "plain,fora,first-block-cache", "--grid-per-class", "0"]
    common += ["--sweep", "fora=2", "--sweep", "first-block-cache=0.2"]
    script = str(ROOT / "benchmarks" / "compare.py")
    single = [sys.executable, script, *common, "--out", str(d / "one")]
    sharded = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    sharded += [script, *common, "--out", str(d / "two")]
    for cmd in (single, sharded):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads((d / "one.json").read_text())
    two = json.loads((d / "two.json").read_text())
    assert two["context"]["quality_processes"] == 2 and one["context"]["quality_processes"] == 1
    keys = (
        "block_evals_per_image",
        "fid",
        "fid_subset_std",
        "fid_floor",
        "class_accuracy",
        "psnr",
        "psnr_se",
    )
    assert len(one["rows"]) == len(two["rows"]) == 5
    for a, b in zip(one["rows"], two["rows"]):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["method"]


def _fake(rows_spec):
    """A result as `run_bench` returns it, from (method, setting, seconds, per-image PSNRs, FID, spread)."""
    rows, results = [], []
    for method, setting, t, psnr, fid, spread in rows_spec:
        rows.append(Row(method, setting, "ddim", 20 if method == "plain" and setting == "ref" else 10))
        pp = torch.tensor(psnr, dtype=torch.float64)
        results.append({
            "time_per_image_s": t, "time_min_s": t, "time_max_s": t, "peak_mem_mb": 1.0, "n": len(psnr),
            "block_evals_per_image": 1.0, "psnr": float(pp.mean()), "psnr_se": 0.1, "per_image_psnr": pp,
            "fid": fid, "fid_subset_mean": fid, "fid_subset_std": spread, "fid_floor": 0.1,
            "class_accuracy": 0.8, "ref": "plain ddim 20",
        })  # fmt: skip
    rows[0].setting = ""
    return {"context": {"args": {"ref_steps": 20}}, "rows": rows, "results": results}


def test_summary_picks_best_competitor_at_equal_cost():
    res = _fake([
        ("plain", "ref", 2.0, [100.0] * 4, 4.0, 0.3),
        ("ilf", "w", 1.0, [31.0, 32.0, 33.0, 34.0], 4.5, 0.3),
        ("plain", "a", 1.04, [30.0, 31.0, 32.5, 33.0], 4.4, 0.3),  # within 5%: the best competitor
        ("fora", "b", 0.97, [20.0, 21.0, 22.0, 23.0], 3.0, 0.3),  # within 5%, much better FID
        ("plain", "c", 1.2, [40.0] * 4, 4.0, 0.3),  # better, but 20% dearer: not a competitor
    ])  # fmt: skip
    (line,) = summarize(res)
    assert "best competitor at this cost" in line and "plain a ddim 10 steps" in line
    # a row of another solver has its PSNR against other reference images: it competes on FID only
    other = _fake([("plain", "x", 1.0, [60.0] * 4, 4.5, 0.3)])
    other["rows"][0].solver, other["results"][0]["ref"] = "dpmpp_2m", "plain dpmpp_2m 20"
    res2 = {**res, "rows": res["rows"] + other["rows"], "results": res["results"] + other["results"]}
    assert summarize(res2)[0] == line
    other["results"][0]["fid"] = 3.5
    assert (
        "FID: better beyond the subset spread for fora b ddim 10 steps (3.000), plain dpmpp_2m 10 steps (3.500)"
        in (summarize(res2)[0])
    )
    assert "margin +0.88 ± 0.12 dB" in line  # per-image differences 1, 1, 0.5, 1
    assert "ILF ahead by more than 2 SE" in line
    assert "better beyond the subset spread for fora b ddim 10 steps" in line and "2.00x" in line
    assert "Combining helps" not in line
    assert "No faster competitor has a higher PSNR" in line
    res["results"][2]["per_image_psnr"] = torch.tensor([31.0, 32.0, 33.5, 34.0], dtype=torch.float64)
    res["results"][3]["fid"] = 4.4
    (line,) = summarize(res)
    assert "within 2 SE" in line and "no competitor at this cost is better" in line
    res["results"][2]["time_per_image_s"] = res["results"][3]["time_per_image_s"] = 1.5
    assert "no competitor within 5%" in summarize(res)[0]
    res["rows"][1].method = "ilf+fora"  # a combination is judged against the time-PSNR frontier
    assert "Combining helps: yes" in summarize(res)[0]
    res["results"][4]["time_per_image_s"] = 0.9
    line = summarize(res)[0]
    assert "Combining helps: no, plain c ddim 10 steps is at least as fast" in line
    # a competitor more than 5% faster with a higher PSNR is named even though it is outside the band
    assert "Faster and higher PSNR: plain c ddim 10 steps (900.00 ms/image, 40.00 dB, +7.50 ± 0.65 dB" in line
    # ... but not one whose PSNR is against another solver's reference, even faster and higher
    other["results"][0]["time_per_image_s"], other["results"][0]["per_image_psnr"] = (
        0.5,
        torch.full((4,), 90.0),
    )
    other["results"][0]["psnr"] = 90.0
    res3 = {**res, "rows": res["rows"] + other["rows"], "results": res["results"] + other["results"]}
    assert summarize(res3)[0] == line


def test_summary_names_a_level_competitor_just_past_the_band():
    res = _fake([
        ("plain", "ref", 2.0, [100.0] * 4, 4.0, 0.3),
        ("ilf", "w", 1.0, [31.0, 32.0, 33.0, 34.0], 4.5, 0.3),
        ("plain", "a", 1.02, [29.0, 30.0, 31.0, 32.0], 4.4, 0.3),  # in the band, 2 dB behind
        ("taylorseer", "b", 1.07, [31.0, 32.5, 32.5, 34.0], 4.4, 0.3),  # 7% slower, level
        ("plain", "c", 1.15, [40.0] * 4, 4.0, 0.3),  # 15% slower: past the named range
    ])  # fmt: skip
    (line,) = summarize(res)
    assert "ILF ahead by more than 2 SE" in line
    assert (
        "Just past the band (5%-10% slower): taylorseer b ddim 10 steps (1070.00 ms/image, +7.0% time): "
        "PSNR 32.50 vs 32.50 dB, margin +0.00 ± 0.20 dB: within 2 SE: level." in line
    )
    res["results"][3]["per_image_psnr"] = torch.tensor([35.0, 36.0, 36.5, 37.0], dtype=torch.float64)
    res["results"][3]["psnr"] = 36.125
    assert "the competitor is ahead by more than 2 SE." in summarize(res)[0]
    # a competitor ILF beats by more than 2 SE, or one of another reference, is not named
    res["results"][3]["per_image_psnr"] = torch.tensor([29.0, 30.0, 31.0, 32.5], dtype=torch.float64)
    res["results"][3]["psnr"] = 30.625
    assert "Just past the band" not in summarize(res)[0]
    res["results"][3]["per_image_psnr"] = torch.tensor([35.0, 36.0, 36.5, 37.0], dtype=torch.float64)
    res["results"][3]["ref"] = "plain dpmpp_2m 20"
    assert "Just past the band" not in summarize(res)[0]


def test_frontier():
    xs, ys = [1.0, 2.0, 3.0, 4.0, 2.5], [10.0, 8.0, 9.0, 5.0, 7.0]
    assert frontier(xs, ys, lower_better=True) == [0, 1, 4, 3]
    assert frontier(xs, ys, lower_better=False) == [0]


def test_grid_only_main_job(tiny_setup, capsys):
    d, model_dir, weights = tiny_setup
    args = ["bench", "--grid-only", "--model", model_dir, "--ref-steps", "6", "--grid-per-class", "1"]
    assert main([*args, "--weights", weights, "--repeats", "2", "--out", str(d / "g")]) == 0
    assert (d / "g_grid.png").stat().st_size > 0 and not (d / "g.csv").exists()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "speed-up" in ln]
    assert [ln.split(":")[0].strip() for ln in lines] == [
        "plain 6 steps",
        "ILF 4 steps",
        "plain 6 steps (equal cost)",
    ]
    assert "22 block evaluations per image" in lines[1]  # 4 steps x 4 blocks + 2 looped steps x (2 + 1)
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(d / "h")])
    assert e.value.code == 2  # no weights: a one-line usage error


def _fused_blocks(transformer) -> int:
    from diffusers.models.attention import BasicTransformerBlock

    from ilf_runtime.fused import is_fused

    return sum(is_fused(m) for m in transformer.modules() if isinstance(m, BasicTransformerBlock))


def test_fused_rows_equal_eager_rows_interleaved(tiny_setup):
    """--fused-rows: each plain and ILF row gets a fused twin, fused for its own run only; the twins'
    images equal the eager rows' to float tolerance, at the same counted block evaluations."""
    from ilf_runtime.bench.run import Runner, load_bench_model, time_rows

    _, model_dir, weights = tiny_setup
    a = BenchArgs(model=model_dir, methods="plain,ilf", solvers="ddim", plain_steps="3", ref_steps=4)
    eager_only = default_rows(a, [weights])
    a.fused_rows = True
    rows = default_rows(a, [weights])
    assert [(r.method, r.steps, r.fused) for r in rows] == [
        ("plain", 4, False), ("plain", 4, True), ("plain", 3, False), ("plain", 3, True),
        ("ilf", 4, False), ("ilf", 4, True),
    ]  # fmt: skip
    assert [r for r in rows if not r.fused] == eager_only
    assert rows[1].label == "plain fused ddim 4 steps"
    assert rows[5].label == "ilf fb loop last:2; fused ddim 4 steps"
    assert rows[0].is_ref and not rows[1].is_ref  # PSNR and speed-up stay against the eager row
    model = load_bench_model(a)
    t = model.transformer
    runner = Runner(model, {"class_labels": torch.tensor([0, 3, 7, 9])}, [0, 1, 2, 3], None)
    for eager, fused in zip(rows[::2], rows[1::2]):
        with runner.attached(fused):
            assert _fused_blocks(t) == LAYERS + (fused.weights is not None)  # the feedback block too
        assert _fused_blocks(t) == 0
        want, evals = runner.quality_images(eager, [range(4)])
        got, fused_evals = runner.quality_images(fused, [range(4)])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert fused_evals == evals  # the counter sees the fused forward's attention
    assert len(time_rows(runner, rows, range(2), 1)) == len(rows)
    assert _fused_blocks(t) == 0 and not hasattr(t, "ilf_loop")


def test_fused_model_and_fused_rows_end_to_end(tiny_setup, tmp_path, capsys):
    from ilf_runtime.bench.run import load_bench_model
    from ilf_runtime.fused import has_fused_blocks

    _, model_dir, weights = tiny_setup
    with pytest.raises(ValueError, match="plain and ILF rows only"):
        default_rows(BenchArgs(model=model_dir, fused=True), [weights])
    with pytest.raises(ValueError, match="exclusive"):
        BenchArgs(model=model_dir, methods="plain,ilf", fused=True, fused_rows=True)
    assert has_fused_blocks(load_bench_model(BenchArgs(model=model_dir, methods="plain,ilf", fused=True)))
    # the report of a run with fused rows: twins side by side, rebuilt by --report-only
    stem = tmp_path / "fr"
    args = ["bench", *_common(model_dir), "--weights", weights, "--methods", "plain,ilf", "--fused-rows"]
    assert main([*args, "--plain-steps", "3", "--grid-per-class", "0", "--out", str(stem)]) == 0
    with open(tmp_path / "fr.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["setting"], int(r["steps"])) for r in rows] == [
        ("plain", "", 6), ("plain", "fused", 6), ("plain", "", 3), ("plain", "fused", 3),
        ("ilf", "fb loop last:2", 4), ("ilf", "fb loop last:2; fused", 4),
    ]  # fmt: skip
    assert rows[0]["ref"] == "self" and float(rows[1]["psnr"]) > 60  # fused against eager: rounding only
    for eager, fused in zip(rows[::2], rows[1::2]):
        assert eager["block_evals_per_image"] == fused["block_evals_per_image"]
    md = (tmp_path / "fr.md").read_text()
    (tmp_path / "fr.md").unlink()
    assert main(["bench", "--report-only", "--out", str(stem)]) == 0
    assert (tmp_path / "fr.md").read_text() == md
    specs = json.loads((tmp_path / "fr.json").read_text())["row_specs"]
    assert [s.get("fused", False) for s in specs] == [False, True] * 3
    assert "fused" not in specs[0]  # a row without it is recorded as before the field existed


def test_equal_evaluations_summary_compares_rows_at_most_as_dear():
    res = _fake([
        ("plain", "ref", 2.0, [100.0] * 4, 4.0, 0.3),
        ("ilf", "w", 1.0, [31.0, 32.0, 33.0, 34.0], 4.5, 0.3),
        ("plain", "a", 0.5, [30.0, 31.0, 32.0, 33.0], 4.4, 0.3),  # fewer evaluations, 1 dB behind
        ("taylorseer", "b", 3.0, [31.5, 32.5, 33.5, 34.5], 4.4, 0.3),  # slow on this CPU, few evaluations
        ("plain", "c", 1.0, [40.0] * 4, 4.0, 0.3),  # better, but dearer in evaluations
    ])  # fmt: skip
    for k, evals in enumerate([240, 144, 132, 132, 192]):
        res["results"][k]["block_evals_per_image"] = float(evals)
    (line,) = summarize_evals(res)
    # the time-based summary never sees TaylorSeer (3x slower here); counted in evaluations it is the rival
    assert "taylorseer b ddim 10 steps (132)" in line and "margin -0.50 ± 0.00 dB" in line
    assert "the competitor is ahead by more than 3 SE" in line and "plain c" not in line
    res["results"][3]["per_image_psnr"] = torch.tensor([30.0, 31.0, 32.5, 33.5], dtype=torch.float64)
    res["results"][3]["psnr"] = 31.75
    assert "margin +0.75 ± 0.14 dB (paired SE): ILF ahead by more than 3 SE" in summarize_evals(res)[0]
    res["results"][3]["per_image_psnr"] = torch.tensor([30.0, 31.0, 33.0, 34.5], dtype=torch.float64)
    res["results"][3]["psnr"] = 32.125
    assert "margin +0.38 ± 0.38 dB (paired SE): within 3 SE" in summarize_evals(res)[0]
    res["results"][2]["block_evals_per_image"] = res["results"][3]["block_evals_per_image"] = 150.0
    assert "no other row against plain ddim 20 spends as few" in summarize_evals(res)[0]
