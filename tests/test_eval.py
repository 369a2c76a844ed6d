"""`ilf eval` end to end on a tiny pixel-space DiT, and the bundled model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_dit

from ilf_runtime.cli import main
from ilf_runtime.fashion.classifier import CLASSIFIER_DIR
from ilf_runtime.fashion.evaluate import EvalArgs, evaluate
from ilf_runtime.registry import MODEL_NAMES, load_model


def _needs_data():
    from ilf_runtime.fashion.data import load_fashion_mnist

    if not (CLASSIFIER_DIR / "model.safetensors").is_file():
        pytest.skip("the shipped classifier is missing")
    try:
        load_fashion_mnist("test")
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_evaluate_tiny_model_all_metrics():
    _needs_data()
    model = tiny_dit(in_channels=1, learned_sigma=False)
    r = evaluate(model, EvalArgs(per_class=2, steps=2, ref_steps=3, subsets=2, guidance=2.0), progress=False)
    assert r["n"] == 20 and r["fid"]["subset_n"] == 10 and len(r["fid"]["subsets"]) == 2
    assert r["fid"]["fid"] > r["fid_floor"]["fid"] >= 0  # noise from a random model is far from the data
    # class accuracy re-computed here: the same images (same labels, seeds, sampler) through the
    # shipped classifier, argmax against the label each image was sampled for
    from ilf_runtime import sample
    from ilf_runtime.fashion.classifier import load_fashion_classifier

    labels = torch.arange(10).repeat(2)  # classes interleaved: 0..9, 0..9
    images = sample(model, class_labels=labels, seeds=range(20), num_steps=2, guidance_scale=2.0).images
    with torch.no_grad():
        preds = load_fashion_classifier()(images).argmax(1)
    assert r["class_accuracy"] == pytest.approx((preds == labels).sum().item() / 20, abs=1e-6)
    assert r["paired_vs_ref"]["ref_steps"] == 3 and r["paired_vs_ref"]["n"] == 20
    json.dumps(r)
    with pytest.raises(ValueError, match="10-class, 1-channel"):
        evaluate(tiny_dit(), EvalArgs(per_class=1), progress=False)


def test_eval_cli_writes_json_and_markdown(tmp_path, capsys):
    _needs_data()
    path = tmp_path / "tiny"
    tiny_dit(in_channels=1, learned_sigma=False).save_pretrained(path)
    stem = tmp_path / "res"
    rc = main(
        [
            "eval",
            "--model",
            str(path),
            "--per-class",
            "2",
            "--steps",
            "2",
            "--subsets",
            "2",
            "--out",
            str(stem),
            "--no-progress",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "FID" in text and "class accuracy" in text
    assert json.loads(stem.with_suffix(".json").read_text())[0]["n"] == 20
    assert stem.with_suffix(".md").read_text().startswith("| model |")


@pytest.mark.skipif(
    not (MODEL_NAMES["fashion-dit"][0] / "config.json").is_file(), reason="bundled model not built"
)
def test_bundled_model_loads_offline_and_samples():
    m = load_model("fashion-dit")
    assert m.adapter.name == "dit" and len(m.transformer.transformer_blocks) >= 10 and m.vae is None
    assert m.transformer.config.num_embeds_ada_norm == 10
    from ilf_runtime import sample

    out = sample(m, class_labels=[0, 9], num_steps=4)
    assert out.images.shape == (2, 1, 16, 16)
    assert 0 <= out.images.min() and out.images.max() <= 1 and out.images.std() > 0.05
    assert torch.isfinite(out.latents).all()


@pytest.mark.skipif(
    not (MODEL_NAMES["fashion-dit"][0] / "config.json").is_file(), reason="bundled model not built"
)
def test_bundled_model_class_accuracy_far_above_chance():
    """On the trained bundled model the class accuracy is far from chance (0.1): a metric that paired
    images with the wrong labels, or a model that ignored them, would land near 0.1."""
    _needs_data()
    r = evaluate(load_model("fashion-dit"), EvalArgs(per_class=2, steps=10, subsets=2), progress=False)
    assert r["n"] == 20 and r["class_accuracy"] >= 0.6, r["class_accuracy"]
