"""`ilf tune --from-weights`: looped steps dropped greedily to a budget, the rounds logged and replayed,
the pruned file written as it is or trained on from the original weights."""

from __future__ import annotations

import json

import pytest
from fixtures.tiny import ddim_scheduler, tiny_dit

from ilf_runtime.config import parse_step_spec
from ilf_runtime.tune.prune import greedy_drop, step_spec
from ilf_runtime.weights import load_ilf_weights

VALUE = [1.0, 5.0, 2.0, 8.0, 3.0]  # what each looped step is worth to the synthetic score


def _cost(mask):
    return 10 + 2 * sum(mask)


def test_greedy_drop_removes_the_least_valuable_steps_until_the_budget_fits():
    calls = []

    def score(mask):
        calls.append(tuple(mask))
        return sum(v for v, on in zip(VALUE, mask) if on)

    mask, log = greedy_drop([True] * 5, _cost, 14, score)
    assert [r["dropped"] for r in log] == [0, 2, 4] and mask == [False, True, False, True, False]
    assert [r["cost"] for r in log] == [18, 16, 14] and len(calls) == 5 + 4 + 3
    assert log[0]["psnr"] == max(log[0]["trials"].values()) == 18.0
    calls.clear()  # a resumed run replays the rounds it logged without scoring them again
    again, log2 = greedy_drop([True] * 5, _cost, 14, score, rounds=log[:2])
    assert again == mask and log2[:2] == log[:2] and len(calls) == 3
    assert greedy_drop([True] * 5, _cost, 30, score) == ([True] * 5, [])  # fits already
    with pytest.raises(ValueError, match="even without looped steps the schedule costs 10 .* budget of 9"):
        greedy_drop([True] * 5, _cost, 9, score)


def test_step_spec_round_trips():
    for mask in ([True] * 4, [False, True, False, True], [True, False, False, False]):
        spec = step_spec(mask)
        assert parse_step_spec(spec, 4) == mask
    assert step_spec([True] * 3) == "all"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 8-block DiT and feedback weights looped on all 4 of its student steps (44 evaluations)."""
    from ilf_runtime.train import TrainArgs, main

    root = tmp_path_factory.mktemp("prune")
    model = root / "dit8"
    tiny_dit(num_layers=8, in_channels=1, learned_sigma=False).save_pretrained(model)
    ddim_scheduler(timestep_spacing="trailing").save_pretrained(model)
    a = TrainArgs.from_flat({
        "model": str(model), "out": str(root / "run"), "loop_start": 1, "loop_end": 2, "loop_steps": "all",
        "steps": 4, "teacher_steps": 8, "states": "teacher", "bank_size": 16, "batch_size": 4, "train_steps": 8,
        "warmup": 1, "lr": 3e-3, "ema": 0.5, "val_samples": 4, "progress": False, "device": "cpu",
    })  # fmt: skip
    return str(model), main(a)["weights"]


TINY = ["--budget", "38", "--teacher-steps", "8", "--bank-size", "16", "--batch-size", "4", "--val-samples", "8",
        "--device", "cpu", "--no-progress"]  # fmt: skip


def test_prune_writes_the_pruned_file_as_it_is(trained, tmp_path, capsys):
    from ilf_runtime.cli import main as cli

    model, weights = trained
    out = tmp_path / "p"
    assert (
        cli(
            [
                "tune",
                "--model",
                model,
                "--from-weights",
                weights,
                "--final-steps",
                "0",
                "--out",
                str(out),
                *TINY,
            ]
        )
        == 0
    )
    state = json.loads((out / "prune.json").read_text())
    rounds = state["rounds"]
    assert [len(r["trials"]) for r in rounds] == [4, 3] and [r["cost"] for r in rounds] == [41, 38]
    for r in rounds:
        assert r["psnr"] == max(r["trials"].values())
    kept = [i for i in range(4) if i not in {r["dropped"] for r in rounds}]
    w, src = load_ilf_weights(out / "feedback.safetensors"), load_ilf_weights(weights)
    assert w.sampler["loop_steps"] == w.config.loop_steps == ",".join(map(str, kept))
    assert w.config.block_evals(8, 4) == 38 and w.metadata["training"]["prune"]["rounds"] == rounds
    assert all((w.tensors[k] == src.tensors[k]).all() for k in src.tensors)  # same weights, fewer steps
    # the final validation is the pruned schedule the last round chose (same seeds, same sampler)
    assert state["final"]["validation"]["psnr"] == pytest.approx(rounds[-1]["psnr"], abs=1e-9)
    assert state["final"]["validation"]["block_evals"] == 38
    assert "pruned to loop steps" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # an earlier pruning is not overwritten silently
        cli(
            [
                "tune",
                "--model",
                model,
                "--from-weights",
                weights,
                "--final-steps",
                "0",
                "--out",
                str(out),
                *TINY,
            ]
        )


def test_prune_then_train_on_from_the_file(trained, tmp_path):
    from ilf_runtime.cli import main as cli

    model, weights = trained
    out = tmp_path / "p"
    assert cli(["tune", "--model", model, "--from-weights", weights, "--final-steps", "3", "--warmup", "1",
                "--out", str(out), *TINY]) == 0  # fmt: skip
    w, src = load_ilf_weights(out / "feedback.safetensors"), load_ilf_weights(weights)
    t = w.metadata["training"]
    assert t["steps"] == 3 and t["init_weights"]["content_sha256"] == src.metadata["content_sha256"]
    assert w.config.block_evals(8, 4) == 38 and len(t["prune"]["rounds"]) == 2
    assert any(not (w.tensors[k] == src.tensors[k]).all() for k in src.tensors)  # trained on


def test_prune_budget_below_the_plain_steps_is_one_line(trained, tmp_path, capsys):
    from ilf_runtime.cli import main as cli

    model, weights = trained
    with pytest.raises(SystemExit) as e:
        cli(["tune", "--model", model, "--from-weights", weights, "--out", str(tmp_path / "p"), *TINY,
             "--budget", "30"])  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "costs 32 block evaluations per image" in err
