"""Cache baselines (ilf_runtime.caches): bitwise identity with skipping off, fewer counted block
evaluations and bounded error with skipping on, bitwise restore after removal, on tiny DiT and PixArt."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_inputs, tiny_dit, tiny_pixart
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

from ilf_runtime import ILFConfig, apply_ilf, remove_ilf, sample
from ilf_runtime.caches import (
    BlockEvalCounter,
    DeltaDiTConfig,
    ForaConfig,
    InnerReuseConfig,
    apply_cache,
    get_cache,
    remove_cache,
)

STEPS, LAYERS = 8, 6
PLAIN_EVALS = STEPS * LAYERS
F32 = torch.float32


def _mag(ratios, **kw):
    return MagCacheConfig(mag_ratios=ratios, num_inference_steps=STEPS, **kw)


# (name, skipping off, skipping on, exact evaluations with skipping on or None, min SQNR in dB of the
# final latents against the plain sampler's with skipping on: measured 39-44 / 42-47 / 23 / 44-63 /
# 59-66 / 61-63 dB on these tiny models, bounds set about 8 dB below; reusing a whole range's output,
# the ILF paper's baseline, is the crudest and the least faithful)
CASES = [
    ("fora", ForaConfig(1), ForaConfig(2), PLAIN_EVALS // 2, 30.0),
    ("delta-dit", DeltaDiTConfig(3, 0.5, 1), DeltaDiTConfig(3, 0.5, 2), PLAIN_EVALS - 4 * 3, 30.0),
    ("inner-reuse", InnerReuseConfig(1, 4, 1), InnerReuseConfig(1, 4, 2), PLAIN_EVALS - 4 * 4, 15.0),
    ("first-block-cache", FirstBlockCacheConfig(0.0), FirstBlockCacheConfig(0.3), None, 30.0),
    (
        "taylorseer",
        TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=STEPS, taylor_factors_dtype=F32),
        TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2, taylor_factors_dtype=F32),
        PLAIN_EVALS - 3 * LAYERS,
        40.0,
    ),
    ("magcache", "mag-off", "mag-on", None, 40.0),
]


def _sqnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio in dB (the tiny models' latents are far outside [-1, 1])."""
    return float(10 * torch.log10(ref.double().square().sum() / (x.double() - ref.double()).square().sum()))


def _dit_sampler(model):
    kw = {"class_labels": [0, 3, 7, 9], "seeds": [0, 1, 2, 3], "num_steps": STEPS, "guidance_scale": 1.0}
    return lambda before_step=None: sample(model, before_step=before_step, return_latents_only=True, **kw)


def _pixart_sampler(model):
    emb, mask, _, _ = prompt_inputs(3)
    kw = {"prompt_embeds": emb, "prompt_attention_mask": mask, "seeds": [0, 1, 2], "num_steps": STEPS}
    return lambda before_step=None: sample(
        model, before_step=before_step, guidance_scale=1.0, return_latents_only=True, **kw
    )


MODELS = {
    "dit": lambda: (m := tiny_dit(num_layers=LAYERS), _dit_sampler(m)),
    "pixart": lambda: (m := tiny_pixart(num_layers=LAYERS), _pixart_sampler(m)),
}


def _run(model, run, config):
    """Latents and counted block evaluations per image, with `config` applied (None: plain)."""
    cache = apply_cache(model, config, num_steps=STEPS) if config is not None else None
    try:
        with BlockEvalCounter(model) as ctr:
            out = run(cache.before_step if cache else None)
    finally:
        if cache is not None:
            remove_cache(model)
    return out.latents, ctr.count


def _calibrated(model, run) -> list[float]:
    cache = apply_cache(model, MagCacheConfig(calibrate=True), num_steps=STEPS)
    run(cache.before_step)
    ratios = cache.mag_ratios()
    remove_cache(model)
    assert len(ratios) == STEPS and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    return ratios


def _no_leftovers(model) -> None:
    for name, m in model.named_modules():
        assert "_diffusers_hook" not in m.__dict__ and "forward" not in m.__dict__, name
    assert get_cache(model) is None


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("name, off, on, evals_on, min_sqnr", CASES, ids=[c[0] for c in CASES])
def test_cache_off_bitwise_on_fewer_blocks_and_restore(kind, name, off, on, evals_on, min_sqnr):
    model, run = MODELS[kind]()
    plain, evals = _run(model, run, None)
    assert evals == PLAIN_EVALS
    if name == "magcache":
        ratios = _calibrated(model, run)
        off, on = _mag(ratios, max_skip_steps=0), _mag(ratios, threshold=0.5, retention_ratio=0.2)
    got_off, evals_off = _run(model, run, off)
    assert torch.equal(got_off, plain), f"{name} with skipping off must reproduce the plain sampler bitwise"
    assert evals_off == PLAIN_EVALS
    got_on, evals_on_counted = _run(model, run, on)
    assert evals_on_counted < PLAIN_EVALS, f"{name} skipped nothing"
    if evals_on is not None:
        assert evals_on_counted == pytest.approx(evals_on)
    assert not torch.equal(got_on, plain)
    assert _sqnr(got_on, plain) > min_sqnr, f"{name}: SQNR {_sqnr(got_on, plain):.1f} dB"
    # a second run through the same cache starts afresh at step 0
    cache = apply_cache(model, on, num_steps=STEPS)
    first, second = run(cache.before_step).latents, run(cache.before_step).latents
    remove_cache(model)
    assert torch.equal(first, second)
    _no_leftovers(model)
    assert torch.equal(run().latents, plain), "removal must restore the plain sampler bitwise"


def test_ilf_with_cache_skips_only_unlooped_steps():
    model = tiny_dit(num_layers=LAYERS)
    run = _dit_sampler(model)
    loop = apply_ilf(model, ILFConfig(loop_start=2, loop_end=3, loop_steps="last:4"))
    with torch.no_grad():
        loop.scales.fill_(0.2)
    mask = loop.config.step_mask(STEPS)
    with BlockEvalCounter(model) as ctr:
        ilf_only = run().latents
    assert ctr.count == loop.config.block_evals(LAYERS, STEPS)  # the counter agrees with the formula
    for off, on, saved in [(ForaConfig(1), ForaConfig(2), 2 * LAYERS), (InnerReuseConfig(1, 4, 1), None, 0)]:
        cache = apply_cache(model, off, num_steps=STEPS, compute_steps=mask)
        assert torch.equal(run(cache.before_step).latents, ilf_only)
        remove_cache(model)
        if on is None:
            continue
        # FORA N=2 would skip steps 1, 3, 5, 7; the loop runs on 4..7, so only 1 and 3 skip
        cache = apply_cache(model, on, num_steps=STEPS, compute_steps=mask)
        with BlockEvalCounter(model) as ctr:
            combined = run(cache.before_step).latents
        remove_cache(model)
        assert ctr.count == loop.config.block_evals(LAYERS, STEPS) - saved
        assert not torch.equal(combined, ilf_only)
    # without compute_steps the loop may run on a reused step: its second pass computes untouched
    # (2 loop blocks + the feedback block), the first pass reuses: 4 x (6 + 3) + 4 x (0 + 3)
    loop.config.loop_steps = "all"
    cache = apply_cache(model, ForaConfig(2), num_steps=STEPS)
    with BlockEvalCounter(model) as ctr:
        run(cache.before_step)
    remove_cache(model)
    assert ctr.count == 4 * (LAYERS + 3) + 4 * 3
    remove_ilf(model)
    with pytest.raises(ValueError, match="this project's caches only"):
        apply_cache(model, FirstBlockCacheConfig(0.1), num_steps=STEPS, compute_steps=mask)


def test_before_step_sees_every_step_and_its_timestep():
    from ilf_runtime.sampling import denoise
    from ilf_runtime.solvers import make_solver
    from tests.fixtures.tiny import ddim_scheduler, dit_cond

    model = tiny_dit(num_layers=2)
    solver = make_solver(ddim_scheduler(), 5)
    seen = []
    denoise(
        model,
        torch.randn(2, 4, 8, 8),
        solver,
        dit_cond(model, torch.tensor([1, 2])),
        before_step=lambda i, t: seen.append((i, t)),
    )
    assert [i for i, _ in seen] == list(range(5))
    assert all(torch.equal(t, solver.timesteps[i]) for i, t in seen)


def test_errors():
    model = tiny_dit(num_layers=LAYERS)
    apply_cache(model, ForaConfig(2), num_steps=STEPS)
    with pytest.raises(RuntimeError, match="already applied"):
        apply_cache(model, ForaConfig(2), num_steps=STEPS)
    remove_cache(model)
    with pytest.raises(RuntimeError, match="no cache"):
        remove_cache(model)
    with pytest.raises(ValueError, match="does not fit"):
        apply_cache(model, InnerReuseConfig(2, LAYERS), num_steps=STEPS)
    _no_leftovers(model)  # a failed apply leaves nothing behind
    with pytest.raises(ValueError, match="num_inference_steps"):
        apply_cache(model, MagCacheConfig(mag_ratios=[1.0] * 4, num_inference_steps=4), num_steps=STEPS)
    with pytest.raises(ValueError, match="interval"):
        ForaConfig(0)


def test_families_parse_and_describe_their_settings():
    from ilf_runtime.caches import FAMILIES, cache_config, describe

    names = ["fora", "delta-dit", "inner-reuse", "first-block-cache", "taylorseer", "magcache"]
    assert list(FAMILIES) == names
    for name, fam in FAMILIES.items():
        for spec in fam.default_sweep.split(","):
            cfg = cache_config(name, spec, dtype=F32, mag_ratios=[1.0] * STEPS)
            assert isinstance(cfg, fam.config_class) and describe(cfg)[0] == name
    assert describe(cache_config("delta-dit", "8:0.5:3", dtype=F32)) == ("delta-dit", "k=8,b=0.5,N=3")
    assert describe(cache_config("inner-reuse", "2-9:2", dtype=F32)) == ("inner-reuse", "blocks 2-9,N=2")
    assert describe(cache_config("magcache", "0.1", dtype=F32)) == ("magcache", "calibrate")
    ts = cache_config("taylorseer", "3:2", dtype=torch.float16)
    assert (ts.cache_interval, ts.max_order, ts.taylor_factors_dtype) == (3, 2, torch.float16)
    assert ts.disable_cache_before_step == 3 and describe(ts) == ("taylorseer", "N=3,order=2")
    early = cache_config("taylorseer", "2:2:1", dtype=F32)
    assert early.disable_cache_before_step == 1 and describe(early) == ("taylorseer", "N=2,order=2,warmup=1")
    with pytest.raises(ValueError, match=r"taylorseer setting '2:2:1:4': expected N\[:ORDER\[:WARMUP\]\]"):
        cache_config("taylorseer", "2:2:1:4", dtype=F32)
    with pytest.raises(ValueError, match=r"delta-dit setting '6:0.5': expected K:BOUNDARY:N"):
        cache_config("delta-dit", "6:0.5", dtype=F32)
    with pytest.raises(ValueError, match="unknown cache family 'teacache'"):
        cache_config("teacache", "1", dtype=F32)


def test_readme_table_lists_the_families():
    """README.md's table of cache methods is `caches.markdown_table()`: every family of
    `caches.FAMILIES`, with its description, and no other."""
    from pathlib import Path

    from ilf_runtime.caches import FAMILIES, markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = [ln for ln in readme.splitlines() if ln.startswith("| `") and ln.count("|") == 5]
    listed = {ln.split("|")[1].strip().strip("`"): ln.split("|")[2].strip() for ln in rows}
    assert listed == {name: f.description for name, f in FAMILIES.items()}
    assert markdown_table() in readme, "paste caches.markdown_table() into README.md"
