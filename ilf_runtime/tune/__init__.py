"""`ilf tune`: search the feedback schedule that fits a cost budget, by successive halving.

A candidate is one ILF schedule: the student's step count, the loop range, the looped steps
(``last:K`` or ``K`` steps spread over the grid, as an explicit list), the loop iterations and the
feedback block's initialisation. Every candidate spends at most ``budget`` block evaluations per
image (per guidance branch), using up what the step count leaves (``K`` as large as fits).

Why successive halving (Jamieson & Talwalkar, 2016; the inner loop of Hyperband): a candidate's
rank after a short distillation predicts its rank after a long one well on this method (the
hand-tuning table `benchmarks/results/ilf_settings.md`: the order at 300 steps held at 1,200), and
halving spends most of the training on the survivors instead of spreading it evenly. Each
candidate trains one schedule (learning-rate horizon = ``final_steps``) in slices: rung ``r``
trains the survivors up to ``min_steps * eta**r`` steps, scores their EMA weights by paired PSNR
against the teacher on held-out seeds (``val_seed``; not the trainer's nor the benchmarks'), and
keeps the best ``1/eta``. The winner then trains on to ``final_steps``, data-parallel over every
rank, and is written as a weights file whose ``training.tune`` metadata holds the search log.

Under torchrun the candidates of a rung are dealt out one per rank (each rank trains its own, no
gradient exchange); the ranks swap scores after each rung. Everything is resumable: each
candidate has its run directory (checkpoint, logs) and ``tune.json`` records every score.
"""

from __future__ import annotations

import shutil
from typing import Any

from ilf_runtime.tune.report import plot_frontier, write_csv
from ilf_runtime.tune.search import STATE, Search, run_search, winner
from ilf_runtime.tune.space import Candidate, TuneArgs, baseline_candidate, rungs, search_space

__all__ = ["Candidate", "TuneArgs", "baseline_candidate", "describe", "main", "rungs", "search_space"]


def main(a: TuneArgs, model: Any = None) -> dict[str, Any]:
    """Runs (or resumes) the search, trains the winner to ``final_steps`` and writes its weights (with
    ``from_weights``: prunes that file's looped steps instead, `tune.prune`)."""
    if a.from_weights:
        from ilf_runtime.tune.prune import main as prune

        return prune(a, model)
    from ilf_runtime.distributed import barrier, init_distributed
    from ilf_runtime.ilf import remove_ilf
    from ilf_runtime.registry import load_model, to_model

    info = init_distributed(a.device)
    model = load_model(a.model, device=info.device) if model is None else to_model(model).to(info.device)
    s = Search(a, model, info)
    barrier(info)  # every rank has looked for an earlier search before rank 0 writes this one
    s.save()
    plan = rungs(len(s.candidates), a)
    total = sum(n * (steps - prev) for (n, steps), prev in zip(plan, [0] + [p[1] for p in plan]))
    bar = None
    if a.progress and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="ilf tune", unit="step")
    try:
        stopped = run_search(s, bar)
    finally:
        if bar is not None:
            bar.close()
    if info.is_main:
        write_csv(s)
    if stopped:
        return {"stopped": stopped, "out": str(s.out), "is_main": info.is_main}
    best = winner(s)
    run = s.trainer(best, info)  # data-parallel over every rank from here
    run.a.progress = a.progress  # ilf train's own bar for the last stretch
    stopped = run.train()
    run.checkpoint()
    if stopped:
        remove_ilf(run.tf)
        return {"stopped": stopped, "out": str(s.out), "is_main": info.is_main}
    log = {"budget": s.budget, "space_size": s.state["space_size"], "method": f"successive halving, eta {a.eta}",
           "candidates": s.state["candidates"], "scores": s.state["scores"]}  # fmt: skip
    result = run.finish({"step": run.step, "seconds": round(run.seconds, 1)}, extra={"tune": log})
    plain = {k: r["psnr"] for k in plain_steps(s) if (r := run.val.plain_psnr(k)) is not None}
    remove_ilf(run.tf)
    if info.is_main:
        s.state["final"] = {"name": best.name, "steps": run.step, "validation": result["validation"]}
        s.save()
        shutil.copyfile(result["weights"], s.out / "feedback.safetensors")
        write_csv(s)
        plot_frontier(s, plain)
    barrier(info)
    return {"winner": best.name, "weights": str(s.out / "feedback.safetensors"), "is_main": info.is_main,
            "validation": result.get("validation"), "budget": s.budget, "out": str(s.out)}  # fmt: skip


def describe(result: dict[str, Any]) -> list[str]:
    """What `ilf tune` prints for `main`'s result."""
    if "stopped" in result:
        return [
            f"stopped ({result['stopped']}); continue with --resume (scores so far: {result['out']}/{STATE})"
        ]
    lines = [
        f"{'pruned to' if 'pruned' in result else 'winner'} {result['winner']} within {result['budget']} block evaluations per image: {result['weights']}"
    ]
    v = result.get("validation") or {}
    if v:
        lines.append(
            f"held-out PSNR {v['psnr']:.2f} dB vs the teacher, {v['gain_db']:+.2f} +- {v['gain_se']:.2f} dB over "
            f"plain {v['equal_cost_steps']} steps ({v['block_evals']} block evaluations); "
            + ("the rounds in prune.json" if "pruned" in result else "candidates.csv and frontier.png")
            + f" in {result['out']}"
        )
    return lines


def plain_steps(s: Search) -> list[int]:
    """Step counts of the plain curve in the frontier plot: around the budget, below the teacher's."""
    lo = max(2, min(c.steps for c in s.candidates) - 1)
    return list(range(lo, min(s.a.teacher_steps, s.budget // s.layers + 4)))
