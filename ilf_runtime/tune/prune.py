"""`ilf tune --from-weights FILE`: fit trained feedback weights to a smaller budget by dropping looped steps.

A loop trained on every step (what `ilf tune` found best on fashion-t2i) costs its extra block
evaluations on every step. To spend fewer, this drops looped steps one at a time, greedily: each
round samples the held-out set once per remaining looped step with that step left out, and drops
the step whose absence costs the least paired PSNR, until the schedule fits the budget (backward
elimination; the candidates per round shrink by one, so ``K`` looped steps cost at most
``K + (K - 1) + ...`` scoring passes and no training). The pruned schedule then trains on for
``final_steps`` from the file's weights (a warm start, `ilf train --init-weights`), or, with
``--final-steps 0``, is written as it is. ``prune.json`` records every round; ``--resume`` replays
the rounds it holds and continues the fine-tuning from its checkpoint.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ilf_runtime.tune.space import TuneArgs

__all__ = ["PRUNE_STATE", "greedy_drop", "main", "step_spec"]

PRUNE_STATE = "prune.json"


def step_spec(mask: list[bool]) -> str:
    """The loop step spec of a mask: ``all`` or the looped steps' indices."""
    return "all" if all(mask) else ",".join(str(i) for i, on in enumerate(mask) if on)


def greedy_drop(
    mask: list[bool],
    cost: Callable[[list[bool]], int],
    budget: int,
    score: Callable[[list[bool]], float],
    rounds: list[dict[str, Any]] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[bool], list[dict[str, Any]]]:
    """Drops looped steps of `mask` until ``cost(mask) <= budget``, each round the one whose absence
    scores best; `rounds` (an earlier log) are replayed without scoring. Returns the mask and the log."""
    mask, log = list(mask), []
    for r in rounds or []:
        mask[r["dropped"]] = False
        log.append(r)
    while cost(mask) > budget:
        looped = [i for i, on in enumerate(mask) if on]
        if not looped:
            raise ValueError(
                f"even without looped steps the schedule costs {cost(mask)} block evaluations per image, "
                f"over the budget of {budget}: raise --budget"
            )
        trials = {i: score([on and j != i for j, on in enumerate(mask)]) for i in looped}
        best = max(trials, key=lambda i: trials[i])
        mask[best] = False
        log.append({"dropped": best, "psnr": trials[best], "cost": cost(mask), "trials": trials})
        if on_round is not None:
            on_round(log[-1])
    return mask, log


def _train_args(a: TuneArgs, w: Any, spec: str, out: Path, fresh: bool) -> Any:
    from ilf_runtime.train.args import TrainArgs

    s = w.sampler
    return TrainArgs(
        model=a.model, out=str(out / "finetune"), loop=replace(w.config, loop_steps=spec),
        steps=int(s.get("num_steps", 10)), teacher_steps=int(s.get("teacher_steps") or a.teacher_steps),
        grid=str(s.get("grid") or ""),
        solver=a.solver or s.get("solver"), guidance=a.guidance if a.guidance is not None else s.get("guidance_scale"),
        states=a.states, bank_size=a.bank_size, bank_cache=str(out / "banks"), prompts=a.prompts,
        val_prompts=a.val_prompts, init_weights=a.from_weights, train_steps=max(1, a.final_steps),
        batch_size=a.batch_size, lr=a.lr, warmup=min(a.warmup, max(1, a.final_steps) - 1), ema=a.ema,
        seed=a.seed, ckpt_every=250, val_every=0, val_samples=a.val_samples, val_seed=a.val_seed,
        resume=not fresh, overwrite=fresh, progress=a.progress, device=a.device,
    )  # fmt: skip


def _open_state(a: TuneArgs, out: Path, info: Any) -> dict[str, Any]:
    from ilf_runtime.weights import read_metadata

    f = out / PRUNE_STATE
    keep = ("resume", "overwrite", "max_minutes", "progress", "device", "out")
    mine = {k: v for k, v in asdict(a).items() if k not in keep}
    mine["from_weights_sha256"] = read_metadata(a.from_weights)["content_sha256"]
    if f.exists() and not (a.resume or a.overwrite):
        raise ValueError(
            f"--out {out} holds an earlier pruning ({PRUNE_STATE}): pass --resume or --overwrite"
        )
    if f.exists() and a.resume:
        state = json.loads(f.read_text())
        if state.get("args") != mine:
            diff = sorted(k for k in mine if state.get("args", {}).get(k) != mine[k])
            raise ValueError(f"{f} was written with different arguments: {', '.join(diff)}")
        return state
    return {"args": mine, "rounds": [], "final": None}


def _save(state: dict[str, Any], out: Path, info: Any) -> None:
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (PRUNE_STATE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(out / PRUNE_STATE)


def main(a: TuneArgs, model: Any = None) -> dict[str, Any]:
    """Prunes the looped steps of ``a.from_weights`` to the budget, fine-tunes, writes the weights."""
    from ilf_runtime.distributed import all_gather_objects, barrier, init_distributed
    from ilf_runtime.ilf import apply_ilf, remove_ilf
    from ilf_runtime.registry import load_model, to_model
    from ilf_runtime.train.checkpoint import CKPT
    from ilf_runtime.train.distill import Distiller
    from ilf_runtime.train.loop import Trainer
    from ilf_runtime.train.validate import Validator
    from ilf_runtime.weights import load_ilf_weights, save_ilf_weights

    info = init_distributed(a.device)
    model = load_model(a.model, device=info.device) if model is None else to_model(model).to(info.device)
    out = Path(a.out)
    w = load_ilf_weights(a.from_weights)
    w.check_backbone(model.transformer)
    layers = len(model.transformer.transformer_blocks)
    budget = a.budget_for(layers)
    state = _open_state(a, out, info)
    barrier(info)
    _save(state, out, info)

    steps = int(w.sampler.get("num_steps", 10))
    spec0 = w.sampler.get("loop_steps") or w.config.loop_steps
    ta = _train_args(a, w, spec0, out, fresh=True)
    loop = apply_ilf(model.transformer, w)
    try:
        val = Validator(model, Distiller(model, loop, ta, info), ta, info)

        def cost(mask: list[bool]) -> int:
            return replace(w.config, loop_steps=step_spec(mask) if any(mask) else "none").block_evals(
                layers, steps
            )

        def score(mask: list[bool]) -> float:
            r = val.run(step_spec(mask) if any(mask) else "none")
            return all_gather_objects(None if r is None else r["psnr"], info)[0]  # rank 0's, to every rank

        def on_round(r: dict[str, Any]) -> None:
            state["rounds"].append(r)
            _save(state, out, info)

        before = val.run(spec0)
        mask, log = greedy_drop(
            loop.config.step_mask(steps, spec0), cost, budget, score, state["rounds"], on_round
        )
        spec = step_spec(mask)
        r = val.run(spec) if a.final_steps == 0 else None
    finally:
        remove_ilf(model.transformer)
    prune_log = {"budget": budget, "from": spec0, "rounds": log}
    if a.final_steps == 0:  # the file's weights with the pruned schedule
        if info.is_main:
            loop = apply_ilf(model.transformer, replace(w.config, loop_steps=spec))
            w.load_into(loop)
            training = dict(w.metadata.get("training") or {}) | {"prune": prune_log}
            sampler = dict(w.sampler) | {"loop_steps": spec}
            save_ilf_weights(
                out / "feedback.safetensors", model.transformer, sampler=sampler, training=training
            )
            remove_ilf(model.transformer)
    else:
        fresh = not (out / "finetune" / CKPT).exists()
        run = Trainer(_train_args(a, w, spec, out, fresh), model, info, val_cache=val.cache)
        stopped = run.train()
        run.checkpoint()
        if stopped:
            remove_ilf(run.tf)
            return {"stopped": stopped, "out": str(out), "is_main": info.is_main}
        res = run.finish({"step": run.step}, extra={"prune": prune_log})
        remove_ilf(run.tf)
        r = res.get("validation")
        if info.is_main:
            shutil.copyfile(res["weights"], out / "feedback.safetensors")
    if info.is_main:
        state["final"] = {"loop_steps": spec, "validation": r, "before": before}
        _save(state, out, info)
    barrier(info)
    return {"winner": f"loop steps {spec} (from {spec0})", "pruned": log, "weights": str(out / "feedback.safetensors"),
            "validation": r, "budget": budget, "out": str(out), "is_main": info.is_main}  # fmt: skip
