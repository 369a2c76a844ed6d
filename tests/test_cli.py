"""`ilf sample` and `ilf info` end to end on tiny models saved with save_pretrained."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    ddim_scheduler,
    dpm_scheduler,
    prompt_inputs,
    tiny_dit,
    tiny_pixart,
    tiny_text_encoder,
    tiny_vae,
)
from PIL import Image
from safetensors.torch import save_file

from ilf_runtime import ILFConfig, apply_ilf, remove_ilf, save_ilf_weights
from ilf_runtime.cli import main


@pytest.fixture(scope="module")
def dit_pipeline_dir(tmp_path_factory):
    from diffusers import DiTPipeline

    path = tmp_path_factory.mktemp("dit_pipe")
    DiTPipeline(
        transformer=tiny_dit(num_classes=1000), vae=tiny_vae(), scheduler=dpm_scheduler()
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pixel_dit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit_pixel")
    model = tiny_dit(in_channels=1, learned_sigma=False)
    model.save_pretrained(path)
    ddim_scheduler(timestep_spacing="trailing").save_pretrained(
        path
    )  # scheduler_config.json beside config.json
    return path, model


@pytest.fixture(scope="module")
def pixart_pipeline_dir(tmp_path_factory):
    from diffusers import PixArtAlphaPipeline

    path = tmp_path_factory.mktemp("pixart_pipe")
    tokenizer, encoder = tiny_text_encoder()
    PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=encoder,
        vae=tiny_vae(),
        transformer=tiny_pixart(),
        scheduler=dpm_scheduler(),
    ).save_pretrained(path)
    return path


def _png(path):
    with Image.open(path) as im:
        return im.size, im.mode


def test_sample_dit_pipeline_with_vae(dit_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = main(
        [
            "sample",
            "--model",
            str(dit_pipeline_dir),
            "--classes",
            "1,5,999",
            "--per-class",
            "2",
            "--steps",
            "3",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "6 images, 3 rows x 2" in text and "dpmpp_2m" in text and "images/s" in text
    (w, h), mode = _png(out)
    assert mode == "RGB" and w < h  # 2 columns, 3 rows


def test_sample_pixel_space_with_weights_and_info(pixel_dit_dir, tmp_path, capsys):
    path, model = pixel_dit_dir
    loop = apply_ilf(model, ILFConfig(loop_start=1, loop_end=2, loop_steps="last:2"))
    with torch.no_grad():
        loop.scales.fill_(0.2)
    weights = save_ilf_weights(tmp_path / "fb.safetensors", model, sampler={"solver": "ddim", "num_steps": 4})
    remove_ilf(model)
    out = tmp_path / "grid.png"
    rc = main(
        [
            "sample",
            "--model",
            str(path),
            "--weights",
            str(weights),
            "--classes",
            "0,1",
            "--per-class",
            "3",
            "--steps",
            "4",
            "--guidance",
            "2.0",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "looped steps 2/4" in text and "ddim" in text
    assert "22 block evaluations per image" in text  # 4 x 4 blocks + 2 looped steps x (2 + 1)
    assert _png(out)[1] == "L"
    assert main(["info", str(weights)]) == 0
    info = capsys.readouterr().out
    assert "DiTTransformer2DModel" in info and '"loop_steps": "last:2"' in info and '"num_steps": 4' in info


def test_sample_pixart_prompts_and_embeds(pixart_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "px.png"
    rc = main(
        [
            "sample",
            "--model",
            str(pixart_pipeline_dir),
            "--prompt",
            "a red cat",
            "--prompt",
            "a blue dog",
            "--per-class",
            "1",
            "--steps",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0 and "2 images" in capsys.readouterr().out
    emb, mask, neg, nmask = prompt_inputs(2)
    embeds = tmp_path / "embeds.safetensors"
    save_file(
        {
            "prompt_embeds": emb,
            "prompt_attention_mask": mask,
            "negative_prompt_embeds": neg,
            "negative_prompt_attention_mask": nmask,
        },
        str(embeds),
    )
    rc = main(
        [
            "sample",
            "--model",
            str(pixart_pipeline_dir),
            "--prompt-embeds",
            str(embeds),
            "--per-class",
            "2",
            "--steps",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0 and "4 images, 2 rows x 2" in capsys.readouterr().out


def _exit_code(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


def test_usage_errors_are_one_line(pixel_dit_dir, tmp_path, capsys):
    path, _ = pixel_dit_dir
    code, err = _exit_code(["sample", "--model", str(tmp_path / "missing")], capsys)
    assert code == 2 and "not a directory and not a built-in name" in err and "Traceback" not in err
    code, err = _exit_code(["sample", "--model", str(path), "--classes", "12"], capsys)
    assert code == 2 and "this model has classes 0..9" in err
    code, err = _exit_code(["sample", "--model", str(path), "--steps", "0"], capsys)
    assert code == 2 and "positive integer" in err
    code, err = _exit_code(["sample", "--model", str(path), "--prompt", "a cat"], capsys)
    assert code == 2 and "use --classes" in err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    code, err = _exit_code(["sample", "--model", str(path), "--weights", str(bad)], capsys)
    assert code == 2 and "not a readable safetensors file" in err
    code, err = _exit_code(["info", str(bad)], capsys)
    assert code == 2 and "not a readable safetensors file" in err
    code, err = _exit_code(["frobnicate"], capsys)
    assert code == 2 and "invalid choice" in err


def test_python_dash_m_and_builtin_model(tmp_path):
    out = tmp_path / "tiny.png"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ilf_runtime",
            "sample",
            "--model",
            "tiny-random",
            "--classes",
            "0,1",
            "--per-class",
            "2",
            "--steps",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "random weights" in r.stdout and out.is_file()


def test_shipped_weights_names(tmp_path):
    from ilf_runtime.registry import MODEL_NAMES, SHIPPED_WEIGHTS, resolve_weights, shipped_weights

    assert resolve_weights(None, "fashion-dit") is None
    assert resolve_weights("x.safetensors", "fashion-dit") == "x.safetensors"
    with pytest.raises(FileNotFoundError, match="ships no feedback weights"):
        resolve_weights("shipped", "tiny-random")
    checked = 0
    for model, files in SHIPPED_WEIGHTS.items():
        folder = MODEL_NAMES[model][0]
        if not folder.is_dir():
            continue  # a built-in whose assets are not in this checkout (see the test below)
        want = {name: folder / f for name, f in files.items()}
        assert shipped_weights(model) == want  # every listed file is there, nothing else is offered
        assert shipped_weights(folder) == want  # the built-in's folder given by its path
        for name, path in want.items():
            spec = "shipped" if name == "default" else f"shipped:{name}"
            assert resolve_weights(spec, model) == str(path)
            checked += 1
        with pytest.raises(FileNotFoundError, match="weights 'shipped:nope'"):
            resolve_weights("shipped:nope", model)
    assert checked >= 3  # fashion-dit's three files are part of the repository


SHIPPED = [(model, name) for model, files in __import__("ilf_runtime.registry").registry.SHIPPED_WEIGHTS.items()
           for name in files]  # fmt: skip


@pytest.mark.parametrize("model_name,weights_name", SHIPPED, ids=[f"{m}:{n}" for m, n in SHIPPED])
def test_each_shipped_weights_file_loads_into_its_model(model_name, weights_name):
    """Every file `SHIPPED_WEIGHTS` lists loads into its bundled model (backbone fingerprint, tensor
    names and shapes checked by `apply_ilf`), carries the scales it stores, and changes the samples of
    the steps it was trained for without making them non-finite."""
    from ilf_runtime import apply_ilf, load_ilf_weights, remove_ilf, sample
    from ilf_runtime.registry import MODEL_NAMES, SHIPPED_WEIGHTS, load_model
    from ilf_runtime.weights import sampler_grid

    folder = MODEL_NAMES[model_name][0]
    if not folder.is_dir():
        pytest.skip(f"built-in model {model_name!r}: asset folder {folder} is not in this checkout")
    path = folder / SHIPPED_WEIGHTS[model_name][weights_name]
    assert path.is_file(), f"{path} is listed in SHIPPED_WEIGHTS[{model_name!r}] but missing"
    try:
        m = load_model(model_name)
    except ImportError as e:  # e.g. fashion-t2i's text encoder package
        pytest.skip(f"{model_name}: {e}")
    w = load_ilf_weights(path)
    loop = apply_ilf(m.transformer, path)
    stored = {k: v for k, v in w.tensors.items() if k.endswith("scales")}
    assert stored, sorted(w.tensors)
    for k, v in stored.items():
        assert torch.equal(loop.state_dict()[k], v), k
    assert loop.scales.abs().max() > 0  # trained, not the zero initialisation
    remove_ilf(m.transformer)
    sampler = w.metadata["sampler"]
    if m.adapter.class_conditional:
        kw = {"class_labels": [0, 7]}
    else:
        kw = {"prompts": (m.example_prompts or ["a red t-shirt", "a blue trouser"])[:2]}
    kw |= {"num_steps": int(sampler["num_steps"]), "solver": sampler["solver"], "seed": 5}
    plain = sample(m, **kw)
    spec = "shipped" if weights_name == "default" else f"shipped:{weights_name}"
    looped = sample(m, ilf=spec, **kw)
    assert torch.isfinite(looped.latents).all()
    assert looped.info["ilf"] == w.config.to_dict()
    assert looped.info["grid"] == sampler_grid(sampler).get("grid")  # a file's own grid, where it has one
    assert (looped.latents - plain.latents).abs().max() > 1e-4


def test_pixart_cli_usage_errors(pixart_pipeline_dir, tmp_path, capsys):
    """Every wrong way of conditioning a text-to-image model is a one-line error with exit 2."""
    base = ["sample", "--model", str(pixart_pipeline_dir), "--steps", "1", "--out", str(tmp_path / "x.png"),
            "--no-progress"]  # fmt: skip
    emb, mask, neg, nmask = prompt_inputs(2)
    no_negative = tmp_path / "no_negative.safetensors"
    save_file({"prompt_embeds": emb, "prompt_attention_mask": mask}, str(no_negative))
    no_embeds = tmp_path / "no_embeds.safetensors"
    save_file({"embeds": emb}, str(no_embeds))
    extra = tmp_path / "extra.safetensors"
    save_file(
        {"prompt_embeds": emb, "prompt_attention_mask": mask, "pooled": emb[:, 0].contiguous()}, str(extra)
    )
    narrow = tmp_path / "narrow.safetensors"
    save_file(
        {"prompt_embeds": emb[..., :3].contiguous(), "prompt_attention_mask": mask,
         "negative_prompt_embeds": neg[..., :3].contiguous(), "negative_prompt_attention_mask": nmask},
        str(narrow),
    )  # fmt: skip
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 40)
    cases = [
        (["--classes", "1,2"], "text-to-image PixArtTransformer2DModel: use --prompt or --prompt-embeds"),
        ([], "needs --prompt or --prompt-embeds"),
        (["--prompt-embeds", str(tmp_path / "missing.safetensors")], "missing.safetensors: cannot read"),
        (["--prompt-embeds", str(garbage)], "garbage.safetensors: cannot read"),
        (["--prompt-embeds", str(no_embeds)], "no 'prompt_embeds' tensor (found ['embeds'])"),
        (["--prompt-embeds", str(extra)], "unexpected tensors ['pooled']"),
        (["--prompt-embeds", str(no_negative)], "guidance needs negative_prompt_embeds"),
        (["--prompt-embeds", str(narrow)], "prompt_embeds have 3 channels, this transformer expects"),
    ]
    for flags, words in cases:
        code, err = _exit_code([*base, *flags], capsys)
        errors = [ln for ln in err.splitlines() if ln.startswith("ilf sample: error:")]
        assert code == 2 and "Traceback" not in err, (flags, err[-2000:])
        assert len(errors) == 1 and words in errors[0] and err.rstrip().endswith(errors[0]), (
            flags,
            err[-2000:],
        )
    assert not (tmp_path / "x.png").exists()


def test_ctrl_c_exits_130(pixel_dit_dir, tmp_path, capsys, monkeypatch):
    """Ctrl-C during `ilf sample` ends with the conventional exit status 130 and one line, no traceback."""
    import ilf_runtime.pipelines

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(ilf_runtime.pipelines, "sample", interrupted)
    path, _ = pixel_dit_dir
    rc = main(
        ["sample", "--model", str(path), "--classes", "0", "--out", str(tmp_path / "g.png"), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert rc == 130 and err.strip() == "interrupted"
    assert not (tmp_path / "g.png").exists()


def _sample_argv(pixel_dit_dir, tmp_path, solver: str) -> list[str]:
    """`ilf sample` arguments for one image with 3-step weights recording `solver`."""
    path, model = pixel_dit_dir
    apply_ilf(model, ILFConfig(loop_start=1, loop_end=2, loop_steps="last:1"))
    try:
        weights = save_ilf_weights(
            tmp_path / "fb.safetensors", model, sampler={"solver": solver, "num_steps": 3}
        )
    finally:
        remove_ilf(model)
    return ["sample", "--model", str(path), "--weights", str(weights), "--classes", "0", "--per-class", "1",
            "--out", str(tmp_path / "g.png"), "--no-progress"]  # fmt: skip


def test_steps_default_to_the_weights_own(pixel_dit_dir, tmp_path, capsys):
    argv = _sample_argv(pixel_dit_dir, tmp_path, "ddim")
    assert main(argv) == 0
    assert ", 3 steps," in capsys.readouterr().out
    assert main([*argv, "--steps", "2"]) == 0
    assert ", 2 steps," in capsys.readouterr().out


def test_solver_defaults_to_the_weights_own(pixel_dit_dir, tmp_path, capsys, caplog):
    argv = _sample_argv(pixel_dit_dir, tmp_path, "dpmpp_2m")
    assert main(argv) == 0
    assert "(dit, dpmpp_2m, 3 steps," in capsys.readouterr().out
    # an explicit other solver is used, with a warning naming the one the weights were made for
    assert main([*argv, "--solver", "ddim"]) == 0
    assert "(dit, ddim, 3 steps," in capsys.readouterr().out
    assert "distilled for the dpmpp_2m solver; sampling with ddim" in caplog.text


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["sample", "--model", "tiny-random"], ["bench"], ["train"]])
def test_unusable_device_is_one_line(command, capsys):
    for device, words in (("cuda", "use --device cpu"), ("gpu", "expected a torch device")):
        if command == ["train"] and device == "gpu":
            continue  # argparse's own choices error
        with pytest.raises(SystemExit) as e:
            main([*command, "--device", device])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
