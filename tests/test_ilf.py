"""apply_ilf / remove_ilf: identity at zero scale, bitwise restore, and the looped forward against
an independent re-computation from the backbone's own blocks."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_inputs, tiny_dit, tiny_pixart

from ilf_runtime import ILFConfig, apply_ilf, get_ilf, remove_ilf
from ilf_runtime.config import parse_step_spec


def _dit_call(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([999, 500, 3][:batch])
    y = torch.tensor([1, 7, 10][:batch])  # 10 = the null class
    return lambda: model(x, timestep=t, class_labels=y).sample


def _pixart_call(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    emb, mask, _, _ = prompt_inputs(batch, seed=seed)
    t = torch.tensor([901, 17][:batch])
    added = {"resolution": None, "aspect_ratio": None}
    return lambda: (
        model(
            x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t, added_cond_kwargs=added
        ).sample
    )


MODELS = {"dit": (tiny_dit, _dit_call), "pixart": (tiny_pixart, _pixart_call)}

CONFIGS = [
    ILFConfig(loop_start=1, loop_end=2),
    ILFConfig(loop_start=0, loop_end=3, loop_iters=2, scale_shape="channel", feedback_init="copy:2"),
    ILFConfig(loop_start=2, loop_end=2, feedback_t_shift=100, feedback_init="copy:0"),
]


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("cfg", CONFIGS, ids=["mid", "all-iter2-chan", "one-shift"])
def test_identity_at_zero_scale_and_bitwise_restore(kind, cfg):
    build, call = MODELS[kind]
    model = build()
    run = call(model)
    with torch.no_grad():
        before = run()
        loop = apply_ilf(model, cfg)
        assert torch.count_nonzero(loop.scales) == 0
        at_zero = run()
        with torch.no_grad():
            loop.scales.fill_(0.3)
        looped = run()
        remove_ilf(model)
        after = run()
    assert torch.equal(before, at_zero), "zero-scale loop must be the identity, bit for bit"
    assert not torch.allclose(before, looped, atol=1e-4), "non-zero scales must change the output"
    assert torch.equal(before, after), "remove_ilf must restore the model bit for bit"
    assert get_ilf(model) is None and not hasattr(model, "ilf_loop")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _reference_blocks(blocks, h0, kw, loop, kw_f):
    """The method's forward pass over the block list, written out directly."""
    c = loop.config
    a, b = c.loop_start, c.loop_end
    h = h0
    for j in range(a):
        h = blocks[j](h, **kw)
    h_a = h
    for j in range(a, b + 1):
        h = blocks[j](h, **kw)
    for _ in range(c.loop_iters):
        f = loop.feedback(h, **kw_f)
        h = h_a
        for i, j in enumerate(range(a, b + 1)):
            h = blocks[j](h + loop.scales[i] * f, **kw)
    for j in range(b + 1, len(blocks)):
        h = blocks[j](h, **kw)
    return h


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize(
    "cfg", CONFIGS[:2] + [ILFConfig(loop_start=1, loop_end=3, loop_iters=3)], ids=["mid", "all", "end"]
)
def test_looped_forward_matches_reference(kind, cfg):
    build, call = MODELS[kind]
    model = build()
    run = call(model)
    blocks = model.transformer_blocks
    loop = apply_ilf(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        loop.scales.copy_(0.5 * torch.randn(loop.scales.shape, generator=g))
    seen = {}

    def record_in(m, a, k):  # returns None: a pre-hook's return value would replace the inputs
        seen.setdefault("in", (a, dict(k)))

    def record_out(m, a, k, o):  # the outermost call of the last block returns last
        seen["out"] = o

    h_in = blocks[0].register_forward_pre_hook(record_in, with_kwargs=True)
    h_out = blocks[-1].register_forward_hook(record_out, with_kwargs=True)
    with torch.no_grad():
        run()
    h_in.remove()
    h_out.remove()
    loop = remove_ilf(model)
    args, kw = seen["in"]
    h0 = args[0] if args else kw.pop("hidden_states")
    with torch.no_grad():
        ref = _reference_blocks(blocks, h0, kw, loop, kw)
    torch.testing.assert_close(seen["out"], ref, rtol=1e-6, atol=1e-6)


def _block_inputs(model, run):
    """(hidden states, keyword arguments) that the first backbone block receives in `run()`."""
    seen = {}

    def record(m, a, k):
        seen.setdefault("in", (a, dict(k)))

    handle = model.transformer_blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        run()
    handle.remove()
    args, kw = seen["in"]
    return (args[0] if args else kw.pop("hidden_states")), kw


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_feedback_timestep_shift_reembeds(kind):
    """With ``feedback_t_shift=S`` the feedback block is conditioned exactly as the backbone's blocks
    are when the model is called at timestep ``max(t - S, 0)``: the looped forward equals the
    reference loop whose feedback block gets the block arguments recorded from such a call (and not
    the unshifted ones). t = 999, 500, 3 (DiT) / 901, 17 (PixArt) with S = 400 covers the clamp at 0."""
    build, call = MODELS[kind]
    model = build()
    shift = 400
    run = call(model)
    h0, kw = _block_inputs(model, run)
    t = kw["timestep"] if kind == "dit" else None
    # the same call at the shifted timesteps: wrap the model call to pass them instead
    real_forward = model.forward

    def shifted_forward(*a, timestep, **k):
        return real_forward(*a, timestep=(timestep - shift).clamp_min(0), **k)

    model.forward = shifted_forward
    _, kw_shifted = _block_inputs(model, run)
    del model.forward
    if kind == "dit":
        assert kw_shifted["timestep"].tolist() == (t - shift).clamp_min(0).tolist() == [599, 100, 0]
    assert not torch.equal(kw_shifted["timestep"], kw["timestep"])

    loop = apply_ilf(model, ILFConfig(loop_start=1, loop_end=2, feedback_t_shift=shift))
    with torch.no_grad():
        loop.scales.fill_(0.5)
    seen = {}
    handle = model.transformer_blocks[-1].register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
    with torch.no_grad():
        run()
    handle.remove()
    loop = remove_ilf(model)
    blocks = model.transformer_blocks
    with torch.no_grad():
        want = _reference_blocks(blocks, h0, kw, loop, kw_shifted)
        unshifted = _reference_blocks(blocks, h0, kw, loop, kw)
    torch.testing.assert_close(seen["out"], want, rtol=1e-6, atol=1e-6)
    assert (seen["out"] - unshifted).abs().max() > 1e-4  # the shift is visible: the check can fail


def test_active_flag_switches_loop_without_rebuild(dit):
    run = _dit_call(dit)
    with torch.no_grad():
        plain = run()
        loop = apply_ilf(dit, ILFConfig(loop_start=1, loop_end=2))
        loop.scales.fill_(0.4)
        handles = list(loop._handles)
        loop.active = False
        off = run()
        loop.active = True
        on = run()
    assert torch.equal(plain, off)
    assert not torch.allclose(plain, on, atol=1e-4)
    assert loop._handles == handles


def test_feedback_block_is_backbone_block_class_and_copy_init(dit, pixart):
    for model in (dit, pixart):
        blocks = model.transformer_blocks
        loop = apply_ilf(model, ILFConfig(loop_start=1, loop_end=2, feedback_init="copy:3"))
        assert type(loop.feedback) is type(blocks[0])
        ref = blocks[3].state_dict()
        got = loop.feedback.state_dict()
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref)
        assert loop.feedback is not blocks[3]
        remove_ilf(model)
        loop = apply_ilf(model, ILFConfig(loop_start=1, loop_end=2, feedback_init="random", init_seed=5))
        same_shapes = {k: v.shape for k, v in loop.feedback.state_dict().items()}
        assert same_shapes == {k: v.shape for k, v in ref.items()}
        assert not torch.equal(loop.feedback.attn1.to_q.weight, blocks[3].attn1.to_q.weight)
        remove_ilf(model)


def test_random_init_is_seeded(dit):
    w = []
    for _ in range(2):
        loop = apply_ilf(dit, ILFConfig(loop_start=0, loop_end=1, init_seed=7))
        w.append(loop.feedback.ff.net[2].weight.clone())
        remove_ilf(dit)
    assert torch.equal(w[0], w[1])


def test_ilf_leaves_backbone_parameters_untouched(dit):
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    loop = apply_ilf(dit, ILFConfig(loop_start=1, loop_end=2, feedback_init="copy:1"))
    assert {n for n, _ in dit.named_parameters() if n.startswith("ilf_loop.")} == {
        "ilf_loop." + n for n, _ in loop.named_parameters()
    }
    remove_ilf(dit)
    after = dit.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_errors():
    with pytest.raises(ValueError, match=r"unsupported model: Linear; supported: DiTTransformer2DModel"):
        apply_ilf(torch.nn.Linear(2, 2), ILFConfig(loop_start=0, loop_end=0))
    model = tiny_dit(num_layers=4)
    with pytest.raises(ValueError, match=r"does not fit a backbone with 4 blocks"):
        apply_ilf(model, ILFConfig(loop_start=2, loop_end=4))
    with pytest.raises(ValueError, match=r"copy:9"):
        apply_ilf(model, ILFConfig(loop_start=0, loop_end=1, feedback_init="copy:9"))
    apply_ilf(model, ILFConfig(loop_start=0, loop_end=1))
    with pytest.raises(RuntimeError, match="already applied"):
        apply_ilf(model, ILFConfig(loop_start=0, loop_end=1))
    remove_ilf(model)
    with pytest.raises(RuntimeError, match="no ILF loop"):
        remove_ilf(model)
    with pytest.raises(ValueError, match="loop_start <= loop_end"):
        ILFConfig(loop_start=3, loop_end=2)
    with pytest.raises(ValueError, match="scale_shape"):
        ILFConfig(loop_start=0, loop_end=1, scale_shape="token")
    with pytest.raises(ValueError, match="feedback_init"):
        ILFConfig(loop_start=0, loop_end=1, feedback_init="zeros")
    with pytest.raises(ValueError, match="loop step spec"):
        ILFConfig(loop_start=0, loop_end=1, loop_steps="late")


def test_step_specs_and_block_evals():
    assert parse_step_spec("last:2", 5) == [False, False, False, True, True]
    assert parse_step_spec("first:1", 3) == [True, False, False]
    assert parse_step_spec("every:2", 5) == [True, False, True, False, True]
    assert parse_step_spec("0,-1", 4) == [True, False, False, True]
    with pytest.raises(ValueError, match="outside"):
        parse_step_spec("7", 4)
    cfg = ILFConfig(loop_start=3, loop_end=5, loop_steps="last:5")
    # 10 steps x 10 blocks + 5 looped steps x (3 loop blocks + feedback block)
    assert cfg.block_evals(num_layers=10, num_steps=10) == 120
