"""A text-to-image model directory that names its text encoder loads as a PixArt pipeline with that
encoder; prompts (and a negative prompt) go through the pipeline's own encode_prompt."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def t2i_dir(tmp_path_factory):
    from ilf_runtime import text_encoders

    try:
        text_encoders.encoder_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from diffusers import DDIMScheduler, PixArtTransformer2DModel

    from ilf_runtime.registry import DEFAULT_SCHEDULER

    torch.manual_seed(0)
    t = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3, num_layers=3,
        sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=384, norm_type="ada_norm_single",
    ).eval()  # fmt: skip
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.02 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("t2i")
    t.save_pretrained(d)
    DDIMScheduler.from_config(DEFAULT_SCHEDULER).save_pretrained(d)
    defaults = {
        "text_encoder": text_encoders.ENCODER_PACKAGE,
        "max_sequence_length": 16,
        "guidance_scale": 3.0,
        "example_prompts": ["a red sneaker", "a blue bag"],
    }
    (d / "ilf_defaults.json").write_text(json.dumps(defaults))
    return d


def test_loads_as_a_pipeline_with_its_encoder(t2i_dir):
    from diffusers import PixArtAlphaPipeline

    from ilf_runtime import load_model, sample

    m = load_model(t2i_dir)
    assert isinstance(m.pipeline, PixArtAlphaPipeline) and m.pipeline.text_encoder is not None
    assert m.guidance == 3.0 and m.encode_kwargs["max_sequence_length"] == 16
    out = sample(m, prompts=["a red sneaker", "a dinosaur"], num_steps=3)
    assert out.images.shape == (2, 3, 8, 8) and out.labels == ["a red sneaker", "a dinosaur"]
    # another negative prompt changes the guided images; the same one repeats them exactly
    a = sample(m, prompts=["a red sneaker"], num_steps=3, negative_prompt="a blue bag").images
    b = sample(m, prompts=["a red sneaker"], num_steps=3, negative_prompt="a blue bag").images
    c = sample(m, prompts=["a red sneaker"], num_steps=3).images
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_embeddings_equal_the_pipeline_call(t2i_dir):
    from ilf_runtime import load_model
    from ilf_runtime.models import encode_prompts
    from ilf_runtime.text_encoders import encode

    m = load_model(t2i_dir)
    emb, mask, neg, nmask = encode_prompts(m, ["a red sneaker"], "", True)
    ref, ref_mask = encode(["a red sneaker", ""])
    torch.testing.assert_close(emb, ref[:1])
    torch.testing.assert_close(neg, ref[1:])
    assert torch.equal(mask, ref_mask[:1]) and torch.equal(nmask, ref_mask[1:])


def test_cli_prompt_grid_with_negative_prompt(t2i_dir, tmp_path, capsys):
    from PIL import Image

    from ilf_runtime.cli import main

    out = tmp_path / "grid.png"
    argv = ["sample", "--model", str(t2i_dir), "--prompt", "a red sneaker", "--prompt", "a blue bag"]
    rc = main(
        [*argv, "--negative-prompt", "a green coat", "--per-class", "2", "--steps", "3", "--out", str(out)]
    )
    assert rc == 0 and out.is_file()
    assert "2 rows x 2" in capsys.readouterr().out
    w, _ = Image.open(out).size
    assert w > 2 * 64  # the prompts are written left of their rows
    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", str(t2i_dir), "--classes", "1", "--out", str(out)])
    assert e.value.code == 2


def test_eval_prompts_end_to_end(t2i_dir, tmp_path, capsys):
    from ilf_runtime.fashion.data import load_fashion_mnist

    try:
        load_fashion_mnist("test")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from ilf_runtime.cli import main

    out = tmp_path / "ev"
    rc = main(["eval", "--model", str(t2i_dir), "--per-class", "1", "--steps", "2", "--ref-steps", "3",
               "--subsets", "2", "--out", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0
    r = json.loads(out.with_suffix(".json").read_text())[0]
    assert r["n"] == 60 and r["accuracy"]["held_out"]["n"] == 6 and r["accuracy"]["seen"]["n"] == 54
    assert r["ceiling"]["all"]["colour"]["acc"] == 1.0  # rendered garments have exactly their colour
    assert 0 <= r["accuracy"]["all"]["full"]["acc"] <= 1 and "paired_vs_ref" in r
    assert "prompt accuracy (60 images)" in capsys.readouterr().out
    assert "full-prompt acc" in out.with_suffix(".md").read_text()


def test_ilf_train_from_prompt_files_with_guidance(t2i_dir, tmp_path):
    """The trainer's text-to-image path: prompts encoded by the model's own encoder, guidance on,
    validation on other (held-out) prompts, end to end through the CLI."""
    from ilf_runtime import load_ilf_weights
    from ilf_runtime.cli import main

    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("a red sneaker\na blue bag\n\nsneaker, crimson\n")
    val.write_text("a red bag\n")
    out = tmp_path / "run"
    rc = main(
        ["train", "--model", str(t2i_dir), "--out", str(out), "--loop-start", "1", "--loop-end", "1",
         "--steps", "2", "--teacher-steps", "4", "--states", "teacher", "--bank-size", "4", "--batch-size", "2",
         "--train-steps", "2", "--val-samples", "2", "--guidance", "2.5", "--prompts", str(train),
         "--val-prompts", str(val), "--no-progress", "--device", "cpu"]
    )  # fmt: skip
    assert rc == 0
    w = load_ilf_weights(out / "feedback.safetensors")
    assert w.metadata["sampler"]["guidance_scale"] == 2.5
    assert w.metadata["training"]["args"]["prompts"] == str(train)
    assert all(torch.isfinite(t).all() for t in w.tensors.values())
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", str(t2i_dir), "--out", str(out), "--prompts", str(empty), "--no-progress"])
    assert e.value.code == 2


def test_backbone_script_exports_a_loadable_text_to_image_model(t2i_dir, tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    from ilf_runtime.fashion.data import load_fashion_mnist

    try:
        load_fashion_mnist("train")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    sys.path.insert(0, str(scripts))
    try:
        spec = importlib.util.spec_from_file_location("train_t2i", scripts / "train_t2i.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(scripts))
    a = mod.T2IArgs(out=str(tmp_path / "run"), steps=2, batch_size=4, warmup=1, size=8, width=16, heads=2,
                    layers=2, threads=1, bf16=False)  # fmt: skip
    assert mod.tb.main(a, mod.TextTask(a)) == 0
    from ilf_runtime import load_model, sample

    m = load_model(tmp_path / "run" / "model")
    assert m.pipeline.text_encoder is not None and m.encode_kwargs["max_sequence_length"] == 16
    val = (tmp_path / "run" / "model" / "val_prompts.txt").read_text().split("\n")
    out = sample(m, prompts=val[:2], num_steps=2, guidance_scale=2.0)
    assert out.images.shape == (2, 3, 8, 8)
    assert len((tmp_path / "run" / "model" / "train_prompts.txt").read_text().splitlines()) == 1404


def test_bench_prompt_accuracy_columns(t2i_dir, tmp_path, capsys):
    import csv

    from ilf_runtime.fashion.data import load_fashion_mnist

    try:
        load_fashion_mnist("test")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from ilf_runtime.cli import main
    from ilf_runtime.fashion.evaluate_prompts import eval_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(sorted(set(eval_prompts(1)[0]))[:12]) + "\n")
    stem = tmp_path / "b"
    args = ["bench", "--model", str(t2i_dir), "--methods", "plain", "--solvers", "ddim", "--plain-steps", "2",
            "--ref-steps", "3", "--per-class", "1", "--subsets", "2", "--time-batch", "4", "--repeats", "1",
            "--grid-per-class", "0", "--prompts-file", str(prompts), "--out", str(stem), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    md = stem.with_suffix(".md").read_text()
    assert "colour acc | full-prompt acc ± SE" in md and "garments' intensity" in md
    with open(stem.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(0 <= float(r["prompt_accuracy"]) <= 1 for r in rows)
    assert float(rows[0]["colour_accuracy"]) >= 0 and rows[0]["fid"]
    before = [stem.with_suffix(s).read_bytes() for s in (".md", ".csv", ".json")]
    assert main(["bench", "--report-only", "--out", str(stem)]) == 0
    assert [stem.with_suffix(s).read_bytes() for s in (".md", ".csv", ".json")] == before


def test_bench_grid_has_a_row_per_prompt(t2i_dir, tmp_path, capsys):
    """The main job's side-by-side grid on a text-to-image model: one row per prompt (the model's
    example prompts unless --prompt is given), labelled, in each of the three panels."""
    from PIL import Image

    from ilf_runtime import ILFConfig, apply_ilf, load_model, remove_ilf, save_ilf_weights
    from ilf_runtime.cli import main

    m = load_model(t2i_dir)
    loop = apply_ilf(m, ILFConfig(loop_start=0, loop_end=1, loop_steps="last:1"))
    with torch.no_grad():
        loop.scales.fill_(0.5)
    w = save_ilf_weights(tmp_path / "fb.safetensors", m, sampler={"num_steps": 2, "loop_steps": "last:1"})
    remove_ilf(m)
    args = ["bench", "--grid-only", "--model", str(t2i_dir), "--weights", str(w), "--ref-steps", "3",
            "--grid-per-class", "2", "--repeats", "2", "--no-progress"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "ILF 2 steps" in out and "2 interleaved passes" in out
    assert main([*args, "--prompt", "a red sneaker", "--prompt", "a blue bag", "--prompt", "a green coat",
                 "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    with Image.open(tmp_path / "a_grid.png") as a, Image.open(tmp_path / "b_grid.png") as b:
        assert a.mode == "RGB" and b.size[1] > a.size[1]  # three rows of prompts against two


@pytest.mark.parametrize("pipeline", ["PixArtAlphaPipeline", "PixArtSigmaPipeline"])
def test_stock_pixart_pipelines_take_the_encoder(t2i_dir, pipeline):
    """Both stock PixArt pipelines, built around the model's transformer and the offline MiniLM
    encoder, give the images of `ilf_runtime.sample` for the same prompts and noise."""
    import diffusers

    from ilf_runtime import load_model, sample
    from ilf_runtime.pixel_decoder import PixelDecoder

    m = load_model(t2i_dir)
    pipe = getattr(diffusers, pipeline)(
        tokenizer=m.pipeline.tokenizer, text_encoder=m.pipeline.text_encoder, vae=PixelDecoder(),
        transformer=m.transformer, scheduler=m.scheduler,
    )  # fmt: skip
    prompts, seeds = ["a red sneaker", "trainer, crimson"], [5, 6]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    stock = pipe(prompts, num_inference_steps=3, guidance_scale=3.0, generator=gens, output_type="pt",
                 use_resolution_binning=False, max_sequence_length=16, clean_caption=False).images  # fmt: skip
    ours = sample(m, prompts=prompts, num_steps=3, seeds=seeds, guidance_scale=3.0).images
    torch.testing.assert_close(stock, ours, rtol=0, atol=1e-5)
