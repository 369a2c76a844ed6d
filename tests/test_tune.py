"""`ilf tune`: the search space and its budget, successive halving's rungs, the outputs, exact resumption,
candidates dealt over torchrun ranks with the same scores as in one process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from fixtures.tiny import NUM_CLASSES, ddim_scheduler, tiny_dit

from ilf_runtime.config import parse_step_spec
from ilf_runtime.tune import Candidate, TuneArgs, baseline_candidate, rungs, search_space
from ilf_runtime.weights import load_ilf_weights


@pytest.fixture(scope="module")
def dit8(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "dit8"
    tiny_dit(num_layers=8, in_channels=1, learned_sigma=False).save_pretrained(path)
    ddim_scheduler(timestep_spacing="trailing").save_pretrained(path)
    return str(path)


TINY = ["--budget", "40", "--teacher-steps", "8", "--bank-size", "16", "--batch-size", "4", "--min-steps", "3",
        "--final-steps", "12", "--candidates", "6", "--val-samples", "8", "--device", "cpu", "--no-progress"]  # fmt: skip


@pytest.mark.parametrize("layers,budget,teacher", [(12, 132, 20), (12, 144, 20), (12, 84, 20), (8, 40, 8)])
def test_every_candidate_fits_the_budget_and_uses_it_up(layers, budget, teacher):
    a = TuneArgs(budget=budget, teacher_steps=teacher, widths=[1, 2, 3, 4], iters=[1, 2])
    space = search_space(a, layers)
    assert space and len({c.name for c in space}) == len(space)
    for c in space:
        cost = c.block_evals(layers)
        assert cost <= budget and teacher % c.steps == 0, c
        looped = sum(parse_step_spec(c.loop_steps, c.steps))
        one_more = cost + c.loop_iters * (c.loop_end - c.loop_start + 2)
        assert looped == c.steps or one_more > budget, f"{c.name} leaves a looped step unspent"
    base = baseline_candidate(layers, budget, teacher)
    assert space[0] == base and base.baseline and sum(c.baseline for c in space) == 1


def test_baseline_is_the_hand_set_rule_of_the_shipped_model():
    # fashion-dit's shipped loop: 10 steps, blocks 5-6, copy of 6, the last 8 steps (144 evaluations)
    assert baseline_candidate(12, 144, 20) == Candidate(10, 5, 6, "last:8", baseline=True)
    assert baseline_candidate(12, 132, 20) == Candidate(10, 5, 6, "last:4", baseline=True)
    # the first aggressive loop (5 steps, every one looped, 75 evaluations; since replaced by a grid file)
    assert baseline_candidate(12, 84, 20) == Candidate(5, 5, 6, "all", baseline=True)
    assert baseline_candidate(12, 120, 20) == Candidate(5, 5, 6, "all", baseline=True)  # 10 steps leave none
    assert baseline_candidate(12, 50, 20) == Candidate(2, 5, 6, "all", baseline=True)
    assert baseline_candidate(12, 14, 20) is None  # one plain step is 12, a looped one 15


def test_spread_pattern_and_speedup():
    a = TuneArgs(speedup=1.8, teacher_steps=20, widths=[2], patterns=["spread"])
    assert a.budget_for(12) == 133  # 20 x 12 / 1.8, rounded down
    specs = {c.loop_steps for c in search_space(a, 12) if c.steps == 10 and not c.baseline}
    assert specs == {"1,4,7,9"}  # 4 looped steps (13 evaluations left / 3 per looped step), the last included


@pytest.mark.parametrize("n,eta,expect", [(12, 2, [(12, 5), (6, 10), (3, 20), (2, 40)]),
                                          (9, 3, [(9, 5), (3, 15)]), (1, 2, [(1, 5)])])  # fmt: skip
def test_rungs_halve_until_one_is_left(n, eta, expect):
    assert rungs(n, TuneArgs(budget=100, eta=eta, min_steps=5, final_steps=1000)) == expect
    capped = rungs(n, TuneArgs(budget=100, eta=eta, min_steps=5, final_steps=10))
    assert all(s <= 10 for _, s in capped) and (capped[-1][0] == 1 or capped[-1][1] == 10)


@pytest.mark.parametrize(
    "kw,needle",
    [({}, "exactly one of --budget"), ({"budget": 9, "speedup": 2.0}, "exactly one of --budget"),
     ({"budget": 0}, "--budget 0"), ({"budget": 9, "eta": 1}, "--eta 1"),
     ({"budget": 9, "patterns": ["first"]}, "--patterns"), ({"budget": 9, "inits": ["zero"]}, "--inits"),
     ({"budget": 9, "min_steps": 50, "final_steps": 10}, "--min-steps 50")],
)  # fmt: skip
def test_bad_arguments_are_named(kw, needle):
    with pytest.raises(ValueError, match=needle.replace("-", "\\-")):
        TuneArgs(**kw)


def test_cli_budget_too_small_is_one_line(dit8, tmp_path, capsys):
    from ilf_runtime.cli import main as cli

    with pytest.raises(SystemExit) as e:
        cli(["tune", "--model", dit8, "--out", str(tmp_path / "t"), *TINY, "--budget", "9"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "no schedule fits a budget of 9" in err and "step counts [2, 4] cost 8 per step" in err


def test_tune_writes_log_csv_plot_and_weights_and_resumes_exactly(dit8, tmp_path, capsys):
    from ilf_runtime.cli import main as cli

    full = tmp_path / "full"
    assert cli(["tune", "--model", dit8, "--out", str(full), *TINY]) == 0
    out = capsys.readouterr().out
    state = json.loads((full / "tune.json").read_text())
    names = [Candidate(**c).name for c in state["candidates"]]
    assert len(names) == 6 and state["candidates"][0]["baseline"]
    assert [len(state["scores"][str(r)]) for r in range(len(state["scores"]))] == [6, 3, 2]  # 3, 6, 12 steps
    winner = state["final"]["name"]
    assert f"winner {winner}" in out
    # survivors are the best of the rung before
    for r in range(1, len(state["scores"])):
        before, now = state["scores"][str(r - 1)], state["scores"][str(r)]
        worst_kept = min(before[n]["psnr"] for n in now)
        assert all(before[n]["psnr"] <= worst_kept for n in before if n not in now)
    rows = list(csv.DictReader((full / "candidates.csv").read_text().splitlines()))
    assert [r["name"] for r in rows] == names
    assert [r["status"] for r in rows].count("winner") == 1
    assert all(int(r["block_evals"]) <= 40 for r in rows)
    assert (full / "frontier.png").stat().st_size > 10_000
    w = load_ilf_weights(full / "feedback.safetensors")
    tune = w.metadata["training"]["tune"]
    assert tune["budget"] == 40 and len(tune["candidates"]) == 6 and w.metadata["training"]["steps"] == 12
    assert (
        Candidate(**next(c for c in tune["candidates"] if Candidate(**c).name == winner)).config() == w.config
    )

    # interrupted after the first candidate, refused without --resume, resumed: the same search
    cut = tmp_path / "cut"
    assert cli(["tune", "--model", dit8, "--out", str(cut), *TINY, "--max-minutes", "1e-9"]) == 0
    assert "stopped (max_minutes)" in capsys.readouterr().out
    assert len(json.loads((cut / "tune.json").read_text())["scores"]["0"]) == 1
    with pytest.raises(SystemExit):
        cli(["tune", "--model", dit8, "--out", str(cut), *TINY])
    assert "pass --resume or --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["tune", "--model", dit8, "--out", str(cut), *TINY, "--resume", "--eta", "3"])
    assert "different arguments: eta" in capsys.readouterr().err
    assert cli(["tune", "--model", dit8, "--out", str(cut), *TINY, "--resume"]) == 0
    resumed = json.loads((cut / "tune.json").read_text())
    assert resumed["scores"] == state["scores"]
    again = load_ilf_weights(cut / "feedback.safetensors")
    for k, v in w.tensors.items():
        torch.testing.assert_close(again.tensors[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.distributed
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch.distributed gloo missing")
@pytest.mark.parametrize("extra", [[], ["--candidates", "2", "--step-counts", "2"]], ids=["six", "two"])
def test_torchrun_deals_candidates_over_ranks_with_the_same_scores(dit8, tmp_path, extra):
    """``two``: the ranks' candidates have different step counts, so each rank has sampled other plain
    baselines alone; the data-parallel final must not mistake those for its own (it hung on that)."""
    from ilf_runtime.cli import main as cli

    one = tmp_path / "one"
    assert cli(["tune", "--model", dit8, "--out", str(one), *TINY, *extra]) == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ilf_runtime", "tune", "--model", dit8, "--out", str(two), *TINY, *extra]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((d / "tune.json").read_text()) for d in (one, two))
    assert b["scores"] == a["scores"]  # each candidate trained alone on its rank: the same numbers
    assert b["final"]["name"] == a["final"]["name"]
    assert load_ilf_weights(two / "feedback.safetensors").metadata["training"]["world_size"] == 2


def test_grid_search_trains_candidates_on_the_grid_it_found(dit8, tmp_path, capsys):
    from ilf_runtime.cli import main as cli
    from ilf_runtime.metrics import paired_psnr
    from ilf_runtime.pipelines import sample
    from ilf_runtime.registry import load_model

    out = tmp_path / "g"
    argv = ["tune", "--model", dit8, "--out", str(out), *TINY, "--grid-search", "--grid-samples", "8",
            "--candidates", "3", "--step-counts", "2,4"]  # fmt: skip
    assert cli(argv) == 0
    assert "grid of 4 steps" in capsys.readouterr().out
    state = json.loads((out / "tune.json").read_text())
    grids = state["grids"]
    for c in (Candidate(**d) for d in state["candidates"]):
        assert c.grid == ("" if c.baseline else grids[str(c.steps)]["spec"]), c
    m = load_model(dit8)
    for n, g in grids.items():
        assert g["psnr"] >= g["uniform_psnr"] and len(g["grid"]) == int(n) and g["grid"][0] == 0
        psnrs = [mv["psnr"] for mv in g["moves"]]
        assert psnrs == sorted(psnrs) and (not psnrs or psnrs[-1] == g["psnr"])
        # the score is what the plain sampler gets on that grid, recomputed here
        kw = {
            "seeds": [40_000_000 + j for j in range(8)],
            "class_labels": [j % NUM_CLASSES for j in range(8)],
        }
        ref = sample(m, num_steps=8, **kw).images
        got = sample(m, num_steps=int(n), grid=g["grid"], grid_steps=8, **kw).images
        assert paired_psnr(got, ref)["psnr"] == pytest.approx(g["psnr"], abs=1e-6)
    w = load_ilf_weights(out / "feedback.safetensors")
    won = Candidate(**next(c for c in state["candidates"] if Candidate(**c).name == state["final"]["name"]))
    assert w.sampler.get("grid", "") == won.grid
    rows = list(csv.DictReader((out / "candidates.csv").read_text().splitlines()))
    assert [r["grid"] for r in rows] == [Candidate(**c).grid for c in state["candidates"]]
