"""Bad input and faults (issue 16, section 3): NaN / Inf, weights-file metadata that is edited, out of
bounds or of the wrong type, bad `sample` arguments, and every CLI subcommand with bad values ending
in a one-line error with exit code 2, never a traceback or a black image with exit 0.
The trainer's faults are in test_bad_input_train.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ddim_scheduler, prompt_inputs, tiny_dit, tiny_pixart
from fixtures.files import edited_copy

from ilf_runtime import ILFConfig, apply_ilf, load_ilf_weights, sample, save_ilf_weights
from ilf_runtime.cli import main as cli
from ilf_runtime.registry import ASSETS
from ilf_runtime.weights import WeightsError, content_hash, metadata_hash

CFG = ILFConfig(loop_start=1, loop_end=2, loop_steps="last:2")
JSON_FIELDS = ("ilf_config", "backbone_config", "sampler", "training")


def _weights(tmp_path: Path, name: str = "fb.safetensors") -> Path:
    model = tiny_dit()
    loop = apply_ilf(model, CFG)
    with torch.no_grad():
        loop.scales.fill_(0.1)
    return save_ilf_weights(tmp_path / name, model, sampler={"solver": "ddim", "num_steps": 4})


def _rewrite(src: Path, dst: Path, edit_meta=None, edit_tensors=None, rehash_meta: bool = True) -> Path:
    """A variant of a weights file; the tensor checksum (and unless told otherwise the metadata
    checksum) recomputed, so that the check under test is the one that fires."""

    def rehash(tensors, raw):
        raw["content_sha256"] = content_hash(tensors)
        if rehash_meta:
            decoded = dict(raw)
            for k in JSON_FIELDS:
                try:
                    decoded[k] = json.loads(raw[k])
                except (KeyError, ValueError):
                    pass
            raw["metadata_sha256"] = metadata_hash(decoded)

    return edited_copy(src, dst, edit_meta, edit_tensors, rehash)


def _edit_json(field: str, **changes):
    def edit(raw):
        raw[field] = json.dumps(json.loads(raw[field]) | changes)

    return edit


# -- weights files ----------------------------------------------------------------------------------
def test_shipped_version_1_files_still_load():
    # The files shipped before format 2 must keep loading under the current reader.
    version_1 = {"feedback.safetensors", "feedback-dpmpp.safetensors"}
    files = sorted((ASSETS / "fashion-dit").glob("feedback*.safetensors"))
    assert version_1 <= {f.name for f in files}
    loaded = {f.name: load_ilf_weights(f) for f in files}
    assert {n for n, w in loaded.items() if w.metadata["format_version"] == "1"} == version_1
    for name in version_1:
        assert loaded[name].config.loop_start == 5


def test_edited_loop_range_is_caught_by_the_metadata_checksum(tmp_path):
    path = _weights(tmp_path)
    moved = _rewrite(
        path,
        tmp_path / "moved.safetensors",
        _edit_json("ilf_config", loop_start=0, loop_end=1),
        rehash_meta=False,
    )
    with pytest.raises(WeightsError, match=r"moved.safetensors: metadata checksum mismatch.*loop range"):
        apply_ilf(tiny_dit(), moved)
    resched = _rewrite(
        path, tmp_path / "s.safetensors", _edit_json("sampler", num_steps=8), rehash_meta=False
    )
    with pytest.raises(WeightsError, match="metadata checksum mismatch"):
        load_ilf_weights(resched)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (
            _edit_json("ilf_config", loop_iters=10**9),
            "invalid ilf_config (loop_iters must be in 1..64, got 1000000000)",
        ),
        (_edit_json("ilf_config", loop_end=10**9), "loop_end must be in 0..4095"),
        (_edit_json("ilf_config", init_seed=-1), "init_seed must be in"),
        (_edit_json("sampler", num_steps=10**9), "metadata 'sampler.num_steps' must be in 1..10000"),
        (_edit_json("sampler", guidance_scale=float("nan")), "'sampler.guidance_scale' must be in"),
        (_edit_json("ilf_config", loop_steps=3), "loop_steps must be a string, got 3"),
        (_edit_json("ilf_config", loop_iters="2"), "loop_iters must be an integer, got '2'"),
        (_edit_json("sampler", num_steps="ten"), "'sampler.num_steps' must be int, found 'ten'"),
        (_edit_json("sampler", solver=["ddim"]), "'sampler.solver' must be str"),
        (
            lambda raw: raw.update(sampler="[1, 2]"),
            "metadata 'sampler' must be a JSON object, found a JSON list",
        ),
        (lambda raw: raw.update(ilf_config="7"), "metadata 'ilf_config' must be a JSON object, found int"),
        (
            lambda raw: raw.update(format_version="abc"),
            "metadata 'format_version' is 'abc', this runtime reads 1 or 2",
        ),
        (lambda raw: raw.update(format_version="3"), "'format_version' is '3'"),
        (lambda raw: raw.pop("backbone_fingerprint"), "metadata 'backbone_fingerprint' is missing"),
    ],
)
def test_header_schema_names_file_and_field(tmp_path, edit, words):
    bad = _rewrite(_weights(tmp_path), tmp_path / "edited.safetensors", edit)
    with pytest.raises(WeightsError) as e:
        load_ilf_weights(bad)
    msg = str(e.value)
    assert "edited.safetensors" in msg and words in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("value", "words"),
    [(float("nan"), "1 NaN or Inf values"), (float("inf"), "NaN or Inf"), (1e30, "reaches 1e+30")],
)
def test_non_finite_or_huge_weights_are_refused_at_save_and_load(tmp_path, value, words):
    model = tiny_dit()
    loop = apply_ilf(model, CFG)
    with torch.no_grad():
        loop.scales[1] = value
    with pytest.raises(WeightsError, match=r"not written\): tensor .scales. .*" + re.escape(words)):
        save_ilf_weights(tmp_path / "nan.safetensors", model)
    assert not list(tmp_path.iterdir()), "nothing is written"

    def poison(t):
        t["scales"][1] = value

    bad = _rewrite(_weights(tmp_path), tmp_path / "bad.safetensors", edit_tensors=poison)
    with pytest.raises(WeightsError, match="bad.safetensors: tensor .scales. .*" + re.escape(words)):
        apply_ilf(tiny_dit(), bad)


def test_info_on_files_missing_scales_or_fingerprint(tmp_path, capsys):
    path = _weights(tmp_path)
    no_scales = _rewrite(path, tmp_path / "ns.safetensors", edit_tensors=lambda t: t.pop("scales"))
    no_fp = _rewrite(path, tmp_path / "nf.safetensors", lambda raw: raw.pop("backbone_fingerprint"))
    for f, words in ((no_scales, "missing tensors ['scales']"), (no_fp, "'backbone_fingerprint' is missing")):
        code, err = _cli(["info", str(f)], capsys)
        assert code == 2 and words in err and err.count("\n") == 1


# -- sampling ----------------------------------------------------------------------------------------
def _poisoned_dit(where: str):
    model = tiny_dit()
    loop = apply_ilf(model, CFG)
    with torch.no_grad():
        if where == "feedback":
            loop.scales.fill_(float("nan"))
        else:
            model.transformer_blocks[0].ff.net[2].weight[0, 0] = float("nan")
            loop.scales.fill_(0.1)
    return model


@pytest.mark.parametrize(
    ("where", "words"), [("feedback", "the feedback weights"), ("backbone", "the backbone's")]
)
def test_nan_weights_raise_instead_of_a_black_image(where, words):
    with pytest.raises(FloatingPointError, match=f"contain NaN, Inf or values beyond 10000: {words}"):
        sample(_poisoned_dit(where), class_labels=[0, 1], num_steps=2, guidance_scale=1.0)


def test_nan_prompt_embeddings_and_huge_guidance_raise():
    emb, mask, neg, nmask = prompt_inputs(1)
    emb[0, 0, 0] = float("nan")
    kw = {
        "prompt_attention_mask": mask,
        "negative_prompt_embeds": neg,
        "negative_prompt_attention_mask": nmask,
    }
    with pytest.raises(FloatingPointError, match="conditioning input .*NaN or Inf"):
        sample(tiny_pixart(), prompt_embeds=emb, num_steps=2, guidance_scale=2.0, **kw)
    with pytest.raises(FloatingPointError, match="guidance scale 1e\\+30 is far too large"):
        sample(tiny_dit(), class_labels=[0], num_steps=3, guidance_scale=1e30)


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"num_steps": "3"}, "num_steps must be an integer >= 1, got '3'"),
        ({"num_steps": 2.5}, "num_steps must be an integer"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number >= 0"),
        ({"guidance_scale": -2.0}, "guidance_scale must be a finite number >= 0"),
        ({"guidance_scale": float("inf")}, "guidance_scale must be a finite number"),
        ({"class_labels": [0.7]}, "class_labels must be integer class ids, got 0.7"),
        ({"class_labels": torch.tensor([0.7])}, "got a torch.float32 tensor"),
        ({"seed": 2**64 - 1}, "seeds must be in 0..9223372036854775807"),
        ({"seed": -1}, "seeds must be in"),
        ({"batch_size": "2"}, "batch_size must be an integer >= 1"),
    ],
)
def test_sample_rejects_bad_arguments(dit, kw, words):
    args = {"class_labels": [0, 1], "num_steps": 2} | kw
    with pytest.raises(ValueError) as e:
        sample(dit, **args)
    assert words in str(e.value)


# -- the command line: every subcommand with bad values -----------------------------------------------
def _cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        cli(argv)
    return e.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "dit"
    tiny_dit(in_channels=1, learned_sigma=False).save_pretrained(path)
    ddim_scheduler(timestep_spacing="trailing").save_pretrained(path)
    return path


def _broken(dit_dir: Path, tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    shutil.copytree(dit_dir, d)
    cfg, weights = d / "config.json", d / "diffusion_pytorch_model.safetensors"
    edits = {
        "list-config": lambda: cfg.write_text("[1, 2]"),
        "bad-json": lambda: cfg.write_text('{"_class_name": '),
        "string-defaults": lambda: (d / "ilf_defaults.json").write_text('{"example_prompts": 3}'),
        "list-scheduler": lambda: (d / "scheduler_config.json").write_text("[3]"),
        "unet": lambda: cfg.write_text(
            json.dumps(json.loads(cfg.read_text()) | {"_class_name": "UNet2DModel"})
        ),
        "no-weights": weights.unlink,
        "truncated-weights": lambda: weights.write_bytes(weights.read_bytes()[:300]),
        "bad-index": lambda: (d / "model_index.json").write_text('{"transformer": 5}'),
        "more-layers": lambda: cfg.write_text(json.dumps(json.loads(cfg.read_text()) | {"num_layers": 5})),
    }
    edits[name]()
    return d


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("list-config", "config.json: expected a JSON object"),
        ("bad-json", "config.json: invalid JSON (Expecting value: line 1 column 17"),
        ("string-defaults", "not a loadable"),
        ("list-scheduler", "scheduler_config.json: expected a JSON object"),
        ("unet", "unsupported model: UNet2DModel"),
        ("no-weights", "not a loadable"),
        ("truncated-weights", "not a loadable"),
        ("bad-index", "not a loadable"),
        ("more-layers", "do not match its config.json: 19 tensors missing"),
    ],
)
def test_broken_model_folders_are_one_line_errors(dit_dir, tmp_path, capsys, name, words):
    d = _broken(dit_dir, tmp_path, name)
    argv = [
        "sample",
        "--model",
        str(d),
        "--classes",
        "0",
        "--per-class",
        "1",
        "--steps",
        "1",
        "--no-progress",
    ]
    code, err = _cli([*argv, "--out", str(tmp_path / "x.png")], capsys)
    last = err.strip().splitlines()[-1]
    assert (
        code == 2
        and "Traceback" not in err
        and last.startswith("ilf sample: error: model ")
        and words in last
    )
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("name", ["list-config", "bad-json", "truncated-weights", "more-layers"])
def test_api_load_model_refuses_broken_folders(dit_dir, tmp_path, name):
    """The same checks in the Python API (and so in `ilf bench`), not only in the CLI."""
    from ilf_runtime import load_model

    d = _broken(dit_dir, tmp_path, name)
    with pytest.raises(ValueError, match=r"^model '.*'") as e:
        load_model(d)
    assert "\n" not in str(e.value)


def _bad_values(tmp_path: Path, dit_dir: Path) -> list[tuple[list[str], str]]:
    """(argv, words of the error) for each subcommand."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    under = str(blocker / "sub" / "x")
    run = tmp_path / "earlier-run"
    run.mkdir(exist_ok=True)
    (run / "log.csv").write_text("step,loss\n1,0.5\n")
    model = ["--model", str(dit_dir)]
    smp = ["sample", *model, "--classes", "0", "--per-class", "1", "--steps", "1", "--no-progress"]
    out = ["--out", str(tmp_path / "x.png")]
    train = ["train", *model, "--loop-start", "1", "--loop-end", "2", "--steps", "2", "--teacher-steps", "4",
             "--states", "teacher", "--bank-size", "4", "--batch-size", "2", "--train-steps", "1",
             "--val-samples", "2", "--no-progress", "--device", "cpu"]  # fmt: skip
    cases = [
        ([*smp, *out, "--device", "meta"], "--device 'meta': expected a torch device such as cpu, cuda"),
        ([*smp, *out, "--device", "tpu:0"], "expected a torch device"),
        ([*smp, *out, "--device", "cuda:7"], "--device cuda:7"),
        ([*smp, "--out", f"{under}.png"], "is a file, not a directory"),
        ([*smp, "--out", str(tmp_path)], "is a directory; expected a file path"),
        ([*smp, *out, "--seed", str(2**64 - 1)], "seeds must be in 0..9223372036854775807"),
        ([*smp, *out, "--guidance", "nan"], "--guidance nan: expected a finite number >= 0"),
        ([*smp, *out, "--guidance", "-1"], "--guidance -1.0: expected a finite number >= 0"),
        ([*smp, *out, "--guidance", "inf"], "expected a finite number"),
        ([*smp, *out, "--guidance", "1e30"], "the guidance scale 1e+30 is far too large"),
        ([*smp, *out, "--weights", str(tmp_path / "none.safetensors")], "none.safetensors: no such file"),
        (["eval", *model, "--out", under, "--per-class", "1"], "is a file, not a directory"),
        (["info", str(tmp_path / "none.safetensors")], "no such file"),
        (["info", str(blocker)], "not a readable safetensors file"),
        ([*train, "--out", under], "is a file, not a directory"),
        ([*train, "--out", str(tmp_path / "t"), "--bank-cache", under], "--bank-cache"),
        (
            [*train, "--out", str(run)],
            "holds an earlier run (log.csv): pass --resume to continue it or --overwrite",
        ),
        (["bench", *model, "--out", under], "is a file, not a directory"),
        (["bench", *model, "--guidance", "nan"], "--guidance nan"),
        (["bench", *model, "--device", "meta"], "expected a torch device"),
    ]
    if not torch.cuda.is_available():
        cases.append(([*smp, *out, "--device", "cuda"], "use --device cpu"))
    return cases


def test_every_subcommand_with_bad_values_is_a_one_line_error(dit_dir, tmp_path, capsys):
    for argv, words in _bad_values(tmp_path, dit_dir):
        code, err = _cli(argv, capsys)
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith(f"ilf {argv[0]}: error: ") and words in err, (
            argv,
            err,
        )
    assert not (tmp_path / "x.png").exists()


def test_argparse_errors_exit_2(capsys):
    for argv in (
        ["bench", "--dtype", "fp64"],
        ["sample", "--model", "m", "--steps", "0"],
        ["train", "--lr", "x"],
    ):
        code, err = _cli(argv, capsys)
        assert (
            code == 2
            and "Traceback" not in err
            and err.strip().splitlines()[-1].startswith(f"ilf {argv[0]}: error:")
        )


def test_shipped_weights_of_the_bundled_folder_given_by_path(tmp_path, capsys):
    out = tmp_path / "x.png"
    argv = ["sample", "--model", str(ASSETS / "fashion-dit"), "--weights", "shipped", "--classes", "0"]
    assert cli([*argv, "--per-class", "1", "--no-progress", "--out", str(out)]) == 0
    assert "feedback.safetensors (looped steps 8/10)" in capsys.readouterr().out


def test_train_backbone_script_loads_no_pickle():
    src = (Path(__file__).parents[1] / "scripts" / "train_backbone.py").read_text()
    assert "weights_only=False" not in src
    assert all("weights_only=True" in line for line in src.splitlines() if "torch.load(" in line)
