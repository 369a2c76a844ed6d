"""The search itself: `Search` (candidates, scores per rung, `tune.json`, one `train.Trainer` per candidate
and slice) and `run_search` (the rungs, candidates dealt over the ranks, scores swapped after each rung)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import MISSING, asdict, fields, replace
from pathlib import Path
from typing import Any

from ilf_runtime.tune.space import (
    Candidate,
    TuneArgs,
    default_step_counts,
    pick_candidates,
    rungs,
    search_space,
)

__all__ = ["STATE", "Search", "prebuild_banks", "run_search", "winner"]

STATE = "tune.json"


class Search:
    """The state of one search: candidates, scores per rung, the run directories; `tune.json`."""

    def __init__(self, a: TuneArgs, model: Any, info: Any):
        self.a, self.model, self.info = a, model, info
        self.out = Path(a.out)
        self.layers = len(model.transformer.transformer_blocks)
        self.budget = a.budget_for(self.layers)
        self.state_file = self.out / STATE
        self.val_cache: dict = {}
        self.t0 = time.monotonic()
        self.scored = 0  # candidates scored in this session
        self.state = self._open()

    def _open(self) -> dict[str, Any]:
        a, f = self.a, self.state_file
        keep = ("resume", "overwrite", "max_minutes", "progress", "device", "out")
        mine = {k: v for k, v in asdict(a).items() if k not in keep}
        if f.exists() and not (a.resume or a.overwrite):
            raise ValueError(
                f"--out {self.out} holds an earlier search ({STATE}): pass --resume or --overwrite"
            )
        if f.exists() and a.overwrite and self.info.is_main:  # the earlier candidates' runs go too
            shutil.rmtree(self.out / "runs", ignore_errors=True)
        if f.exists() and a.resume:
            state = json.loads(f.read_text())
            # a flag added since the search began reads as its default in the stored arguments
            stored = {f.name: f.default for f in fields(TuneArgs) if f.default is not MISSING}
            stored |= state.get("args", {})
            if any(stored.get(k) != v for k, v in mine.items()):
                diff = sorted(k for k in mine if stored.get(k) != mine[k])
                raise ValueError(f"{f} was written with different arguments: {', '.join(diff)}")
            return state
        space = search_space(a, self.layers)
        if not space:
            counts = a.step_counts or default_step_counts(a.teacher_steps, self.layers, 10**9)
            raise ValueError(
                f"no schedule fits a budget of {self.budget} block evaluations per image with {self.layers} "
                f"blocks (step counts {counts} cost {self.layers} per step plus at least 2 per looped step); "
                "raise --budget or lower --speedup"
            )
        chosen = pick_candidates(space, a.candidates, a.seed)
        grids = {}
        if a.grid_search:  # every candidate but the hand-set baseline trains on its step count's grid
            grids = self._grids(sorted({c.steps for c in chosen if not c.baseline}))
            chosen = [c if c.baseline else replace(c, grid=grids[str(c.steps)]["spec"]) for c in chosen]
        return {"args": mine, "budget": self.budget, "layers": self.layers, "space_size": len(space),
                "grids": grids, "candidates": [asdict(c) for c in chosen], "scores": {},
                "final": None}  # fmt: skip

    def _grids(self, step_counts: list[int]) -> dict[str, dict[str, Any]]:
        """`tune.grid.search_grid` for each step count, on rank 0, shared with every rank."""
        import torch

        from ilf_runtime.distributed import all_gather_objects
        from ilf_runtime.train.distill import CondSource
        from ilf_runtime.tune.grid import search_grid

        a, out = self.a, {}
        if self.info.is_main:
            cond = CondSource(self.model, self.train_args(Candidate(1, 0, 0, "all"), fresh=True))
            seeds = [a.grid_seed + j for j in range(a.grid_samples)]
            kw = cond.sample_kwargs(torch.arange(len(seeds)) % cond.n)
            for n in step_counts:
                r = search_grid(self.model, steps=n, teacher_steps=a.teacher_steps, seeds=seeds, sample_kwargs=kw,
                                solver=a.solver, guidance=a.guidance)  # fmt: skip
                out[str(n)] = r | {"spec": ",".join(map(str, r["grid"]))}
                print(
                    f"grid of {n} steps: {r['grid']}: plain {r['uniform_psnr']:.2f} -> {r['psnr']:.2f} dB "
                    f"({r['tries']} tries on {len(seeds)} held-out images)", flush=True
                )  # fmt: skip
        return all_gather_objects(out, self.info)[0]

    def save(self) -> None:
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.state, indent=1))
            tmp.replace(self.state_file)

    @property
    def candidates(self) -> list[Candidate]:
        return [Candidate(**c) for c in self.state["candidates"]]

    def train_args(self, c: Candidate, fresh: bool) -> Any:
        from ilf_runtime.train.args import TrainArgs

        a = self.a
        return TrainArgs(
            model=a.model, out=str(self.out / "runs" / c.name), loop=c.config(), steps=c.steps,
            teacher_steps=a.teacher_steps, grid=c.grid, solver=a.solver, guidance=a.guidance, states=a.states,
            bank_size=a.bank_size, bank_cache=str(self.out / "banks"), prompts=a.prompts,
            val_prompts=a.val_prompts, train_steps=a.final_steps, batch_size=a.batch_size, lr=a.lr,
            warmup=min(a.warmup, a.final_steps - 1), ema=a.ema, seed=a.seed, ckpt_every=10**9,
            val_every=0, val_samples=a.val_samples, val_seed=a.val_seed, resume=not fresh,
            overwrite=fresh, progress=False, device=a.device,
        )  # fmt: skip

    def trainer(self, c: Candidate, info: Any) -> Any:
        from ilf_runtime.train.checkpoint import CKPT
        from ilf_runtime.train.loop import Trainer

        fresh = not (self.out / "runs" / c.name / CKPT).exists()
        return Trainer(self.train_args(c, fresh), self.model, info, val_cache=self.val_cache)

    def score(self, c: Candidate, until: int, info: Any) -> dict[str, Any] | str:
        """Trains `c` up to `until` steps and returns its validation, or why it stopped early."""
        from ilf_runtime.ilf import remove_ilf

        run = self.trainer(c, info)
        try:
            stopped = run.train(until=until)
            run.checkpoint()
            if stopped:
                return stopped
            r = run.validate() or {}
            self.scored += 1
            return dict(r) | {"train_steps": run.step}
        finally:
            remove_ilf(run.tf)

    def last_score(self, c: Candidate) -> tuple[int, dict[str, Any]] | None:
        """(rung, score) of `c`'s last scored rung, or None before its first."""
        rungs_in = [int(k) for k, v in self.state["scores"].items() if c.name in v]
        if not rungs_in:
            return None
        return max(rungs_in), self.state["scores"][str(max(rungs_in))][c.name]

    def out_of_time(self) -> bool:
        """Past ``max_minutes``, once this session has scored at least one candidate (so that every
        session makes progress)."""
        return (
            self.scored > 0
            and self.a.max_minutes > 0
            and time.monotonic() - self.t0 > self.a.max_minutes * 60
        )


def _rank_order(scores: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    """Best first: higher PSNR, then lower cost, then name (deterministic on every rank)."""
    return sorted(names, key=lambda n: (-scores[n]["psnr"], scores[n]["block_evals"], n))


def run_search(s: Search, bar: Any = None) -> str | None:
    """The rungs of successive halving; returns why it stopped early, or None."""
    from ilf_runtime.distributed import DistInfo, all_gather_objects

    info, alive = s.info, [c.name for c in s.candidates]
    by_name = {c.name: c for c in s.candidates}
    local = DistInfo(device=info.device)  # each rank trains its own candidates alone
    if info.enabled and not s.state["scores"]:
        prebuild_banks(s, local)
    prev = 0
    for r, (n, steps) in enumerate(rungs(len(alive), s.a)):
        alive = alive[:n]
        done = s.state["scores"].setdefault(str(r), {})
        todo = [name for name in alive if name not in done]
        if bar is not None:
            bar.update(len(done) * (steps - prev))
        results: dict[str, Any] = {}
        stopped = None
        for name in todo[info.rank :: info.world_size]:
            if s.out_of_time():
                stopped = "max_minutes"
                break
            res = s.score(by_name[name], steps, local)
            if isinstance(res, str):
                stopped = res
                break
            results[name] = res | {"rung": r}
            if bar is not None:
                bar.update(steps - prev)
        for rank, (res, stop) in enumerate(all_gather_objects((results, stopped), info)):
            done.update(res)
            stopped = stopped or stop
            if bar is not None and rank != info.rank:
                bar.update(len(res) * (steps - prev))
        s.save()
        if stopped:
            return stopped
        alive = _rank_order(done, alive)
        prev = steps
        if bar is not None:
            bar.set_postfix(best=alive[0], psnr=f"{done[alive[0]]['psnr']:.2f}")
    return None


def prebuild_banks(s: Search, local: Any) -> None:
    """Under torchrun: each rank builds the teacher banks of different step counts before the first
    rung, so that no two ranks build the same one at once (they share the cache)."""
    from ilf_runtime.distributed import barrier
    from ilf_runtime.ilf import remove_ilf

    if s.a.states == "teacher":
        first = {}
        for c in s.candidates:
            first.setdefault(c.steps, c)
        for c in list(first.values())[s.info.rank :: s.info.world_size]:
            run = s.trainer(c, local)
            try:
                run.d.build_bank(0)
            finally:
                remove_ilf(run.tf)
    barrier(s.info)


def winner(s: Search) -> Candidate:
    scores = s.state["scores"]
    last = scores[max(scores, key=int)]
    return {c.name: c for c in s.candidates}[_rank_order(last, list(last))[0]]
