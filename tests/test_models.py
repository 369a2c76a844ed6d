"""Model adapters (ilf_runtime.models): resolution, conditioning, guidance split, feedback timestep."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ilf_runtime.models import (
    ADAPTERS,
    DiTAdapter,
    PixArtAdapter,
    adapter_for,
    adapter_for_class,
    load_prompt_embeds,
    resolve,
)
from ilf_runtime.registry import to_model
from tests.fixtures.tiny import CAPTION_CHANNELS, prompt_inputs, tiny_dit, tiny_pixart


def test_resolve_transformer_pipeline_and_model():
    dit = tiny_dit()
    t, a = resolve(dit)
    assert t is dit and isinstance(a, DiTAdapter)
    model = to_model(dit)
    assert model.adapter is a and resolve(model) == (dit, a)

    class Pipe:  # anything with a .transformer, as diffusers pipelines have
        transformer = tiny_pixart()

    t, a = resolve(Pipe())
    assert t is Pipe.transformer and isinstance(a, PixArtAdapter)


def test_unsupported_models_are_named():
    with pytest.raises(ValueError, match="unsupported model: Linear; supported: DiTTransformer2DModel"):
        adapter_for(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unsupported model: UNet2DModel"):
        adapter_for_class("UNet2DModel")
    assert adapter_for_class("PixArtTransformer2DModel") is ADAPTERS["pixart"]


def test_checkpoint_with_other_blocks_is_refused():
    dit = tiny_dit()
    dit.transformer_blocks[0].norm_type = "layer_norm"
    with pytest.raises(ValueError, match="norm_type 'ada_norm_zero'"):
        resolve(dit)


def test_dit_conditioning_and_guidance_split():
    dit = tiny_dit()
    a = adapter_for(dit)
    cond = a.conditioning(dit, class_labels=torch.tensor([1, 2]))
    assert cond.kwargs(True)["class_labels"].tolist() == [1, 2, 10, 10]  # (conditional, null class)
    assert cond.kwargs(False)["class_labels"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="0..9"):
        a.conditioning(dit, class_labels=torch.tensor([10]))
    # DiT guides the epsilon channels only, then drops learned sigma
    out = torch.cat([torch.full((1, 8, 2, 2), 3.0), torch.full((1, 8, 2, 2), 1.0)])  # cond, uncond
    eps = a.guided_eps(out, True, 2.0, 4)
    assert eps.shape == (1, 4, 2, 2) and torch.all(eps == 1.0 + 2.0 * (3.0 - 1.0))
    assert a.guided_eps(out[:1], False, 2.0, 4).shape == (1, 4, 2, 2)


def test_pixart_conditioning_and_guidance_split():
    pix = tiny_pixart()
    a = adapter_for(pix)
    emb, mask, neg, nmask = prompt_inputs(2)
    cond = a.conditioning(
        pix, prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=neg,
        negative_prompt_attention_mask=nmask,
    )  # fmt: skip
    torch.testing.assert_close(cond.kwargs(True)["encoder_hidden_states"][:2], neg)  # (negative, positive)
    assert a.conditioning(pix, prompt_embeds=emb, prompt_attention_mask=mask).model_kwargs is None
    with pytest.raises(ValueError, match=f"expects {CAPTION_CHANNELS}"):
        a.conditioning(pix, prompt_embeds=torch.zeros(1, 3, 5), prompt_attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="class_labels"):
        a.conditioning(pix, class_labels=torch.tensor([1]))
    out = torch.cat([torch.full((1, 8, 2, 2), 1.0), torch.full((1, 8, 2, 2), 3.0)])  # uncond, cond
    assert torch.all(a.guided_eps(out, True, 2.0, 4) == 5.0)


def test_condition_set(tmp_path):
    pix = to_model(tiny_pixart())
    emb, _, neg, _ = prompt_inputs(3)
    f = tmp_path / "emb.safetensors"
    save_file({"prompt_embeds": emb, "negative_prompt_embeds": neg[:1]}, str(f))
    items = pix.adapter.condition_set(pix, prompt_embeds=f)
    assert items["negative_prompt_embeds"].shape == emb.shape  # one negative prompt, expanded
    assert items["prompt_attention_mask"].shape == emb.shape[:2]
    dit = to_model(tiny_dit())
    assert dit.adapter.condition_set(dit)["class_labels"].tolist() == list(range(10))
    with pytest.raises(ValueError, match="class labels, not prompts"):
        dit.adapter.condition_set(dit, prompts=["a cat"])


def test_prompt_embeds_file_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file")
    with pytest.raises(ValueError, match="cannot read"):
        load_prompt_embeds(bad)
    other = tmp_path / "other.safetensors"
    save_file({"embeds": torch.zeros(1, 2, 3)}, str(other))
    with pytest.raises(ValueError, match="no 'prompt_embeds' tensor"):
        load_prompt_embeds(other)


@pytest.mark.parametrize("make", [tiny_dit, tiny_pixart], ids=["dit", "pixart"])
def test_feedback_timestep_shift(make):
    model = make()
    a = adapter_for(model)
    h = torch.zeros(2, 16, model.inner_dim)
    kw = {"timestep": torch.tensor([500, 500])}
    assert a.feedback_kwargs(model, kw, {"timestep": torch.tensor(500)}, 0, h) is kw
    shifted = a.feedback_kwargs(model, kw, {"timestep": torch.tensor(500), "added_cond_kwargs": None}, 100, h)
    if isinstance(a, DiTAdapter):
        assert shifted["timestep"].tolist() == [400, 400]
    else:  # PixArt re-embeds the shifted timestep with the transformer's adaLN-single
        ref = model.adaln_single(torch.tensor([400, 400]), None, batch_size=2, hidden_dtype=h.dtype)[0]
        torch.testing.assert_close(shifted["timestep"], ref)
