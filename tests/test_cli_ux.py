"""What a newcomer sees: `ilf models`, per-image PNGs with their settings, help without markup."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ilf_runtime.cli import COMMANDS, build_parser, main
from ilf_runtime.registry import MODEL_NAMES

BUNDLED = (MODEL_NAMES["fashion-dit"][0] / "feedback.safetensors").is_file()


@pytest.mark.skipif(not BUNDLED, reason="the bundled model's shipped weights are not in this checkout")
def test_models_lists_shipped_weights_with_their_targets(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "fashion-dit:" in out and "tiny-random:" in out
    line = next(ln for ln in out.splitlines() if "--weights shipped:aggressive" in ln)
    assert (
        "ddim, 6 steps on the grid 0,3,8,11,15,18, loop last:4" in line
        and "block evals/image" in line
        and "dB over plain" in line
    )
    assert main(["models", "--name", "tiny-random"]) == 0
    assert "no shipped feedback weights" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["models", "--name", "nope"])
    assert e.value.code == 2


def test_out_dir_writes_one_png_per_image_with_its_settings(tmp_path, capsys):
    grid, folder = tmp_path / "g.png", tmp_path / "each"
    argv = ["sample", "--model", "tiny-random", "--classes", "3", "--per-class", "1", "--steps", "2",
            "--out", str(grid), "--out-dir", str(folder), "--seed", "7", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1 image, 1 row x 1" in out and "wrote 1 PNG with" in out
    (png,) = sorted(folder.glob("*.png"))
    with Image.open(png) as im:
        assert im.size == (16, 16) and im.mode == "L"
        assert im.text["seed"] == "7" and im.text["label"] == "3" and im.text["steps"] == "2"
        assert im.text["weights"] == "none" and im.text["solver"]
        pixels = torch.from_numpy(np.asarray(im, dtype=np.float32))
    with Image.open(grid) as g:  # the grid shows it enlarged
        assert g.size[0] > 16 and pixels.shape == (16, 16) and pixels.std() > 0


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_has_a_description_per_flag_and_no_markup(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    text = sub.format_help()
    assert "``" not in text and "`" not in text
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and action.help.strip() and not action.help.startswith("(default"), action.dest


@pytest.mark.parametrize("argv", [["--help"], ["sample", "--help"], ["models", "--help"]])
def test_help_imports_neither_torch_nor_diffusers(argv):
    """`ilf --help` must be fast: it may not import torch or diffusers (seconds on a small machine)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom ilf_runtime.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    )
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    assert r.stdout.strip().splitlines()[-1] == "[]" and "usage: ilf" in r.stdout


def test_choices_match_the_runtime_tables():
    from ilf_runtime.choices import DTYPES, SOLVER_NAMES
    from ilf_runtime.solvers import SOLVERS

    assert tuple(SOLVERS) == SOLVER_NAMES
    import torch as t

    assert all(isinstance(getattr(t, v), t.dtype) for v in DTYPES.values())
