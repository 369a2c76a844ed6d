"""The `ilf` command line: `ilf sample`, `ilf eval`, `ilf bench`, `ilf info`, `ilf train`.

Flags map onto the keyword arguments of `ilf_runtime.sample`. Errors in the arguments or in the
inputs (missing model, bad weights file, wrong labels) end with a one-line message and exit code 2,
not a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ilf_runtime.choices import DTYPES, SOLVER_NAMES, guidance_ok
from ilf_runtime.cliargs import add_dataclass_arguments, from_namespace
from ilf_runtime.fashion.eval_args import EvalArgs
from ilf_runtime.tune.space import TuneArgs

__all__ = ["COMMANDS", "EvalCommand", "InfoArgs", "SampleArgs", "build_parser", "main"]

logger = logging.getLogger(__name__)


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit code 2."""


def int_list(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (an argparse type)."""
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def positive(text: str) -> int:
    """A positive integer (an argparse type)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


POSITIVE = {"type": positive}


@dataclass
class SampleArgs:
    """`ilf sample`: sample images into a PNG grid, one row per class or prompt.

    Args:
        model: model directory (diffusers pipeline or transformer) or built-in name.
        weights: feedback weights file (.safetensors) to apply, or shipped[:NAME] for a built-in model's own.
        classes: class ids of a class-conditional model, e.g. 0,1,2 (default: all classes, up to 10).
        per_class: images per class or prompt.
        prompt: prompt of a text-to-image model.
        negative_prompt: the negative prompt of classifier-free guidance (text-to-image models).
        prompt_embeds: safetensors file with prompt_embeds [, prompt_attention_mask, negative_*].
        steps: solver steps (default: the weights file's, else 20).
        solver: default: the weights file's, else the model's scheduler.
        guidance: classifier-free guidance scale (default: the model's).
        seed: first noise seed; image i uses seed + i.
        loop_steps: steps that run the loop: all, none, first:K, last:K, every:K or 5,7,9.
        batch_size: images per forward batch (default all).
        device: torch device.
        dtype: parameter dtype.
        out: output PNG grid.
        out_dir: also write one PNG per image into this folder, with its seed, label or prompt, steps,
            solver, guidance and weights in the PNG's text chunks.
        progress: show a progress bar (on a terminal).
        cuda_graph: run each batch's denoising loop as one CUDA graph (CUDA only).
        fused: run the blocks through the fused forward (`ilf_runtime.fused`; on the CPU the compiled
            ops are used where benchmarks/cpu_ops.py measured them faster).
    """

    model: str
    weights: str | None = None
    classes: list[int] | None = field(default=None, metadata={"type": int_list})
    per_class: int = field(default=4, metadata=POSITIVE)
    prompt: list[str] = field(default_factory=list)
    negative_prompt: str = ""
    prompt_embeds: str | None = None
    steps: int | None = field(default=None, metadata=POSITIVE)
    solver: str | None = field(default=None, metadata={"choices": SOLVER_NAMES})
    guidance: float | None = None
    seed: int = 0
    loop_steps: str | None = None
    batch_size: int | None = field(default=None, metadata=POSITIVE)
    device: str = "cpu"
    dtype: str = field(default="fp32", metadata={"choices": tuple(DTYPES)})
    out: str = "samples.png"
    out_dir: str | None = None
    progress: bool = True
    cuda_graph: bool = False
    fused: bool = False


@dataclass
class EvalCommand(EvalArgs):
    """`ilf eval`: sample N images per class and measure FID, class accuracy and paired PSNR.

    Args:
        steps: solver steps (default: the weights file's, else 20).
        weights: feedback weights file (.safetensors), or shipped[:NAME].
        model: model directory or built-in name (class-conditional: FID and class accuracy; the text-to-image
            demo: prompt accuracy, see ilf_runtime/fashion/evaluate_prompts.py).
        out: output path stem: writes STEM.json and STEM.md.
        progress: show a progress bar.
        fused: run the blocks through the fused forward (`ilf_runtime.fused`).
    """

    steps: int | None = field(default=None, metadata=POSITIVE)
    solver: str | None = field(default=None, metadata={"choices": SOLVER_NAMES})
    per_class: int = field(default=100, metadata=POSITIVE)
    subsets: int = field(default=5, metadata=POSITIVE)
    batch_size: int = field(default=250, metadata=POSITIVE)
    model: str = "fashion-dit"
    out: str = "eval"
    progress: bool = True
    fused: bool = False


@dataclass
class InfoArgs:
    """`ilf info`: print a feedback weights file's metadata.

    Args:
        file: feedback weights file (.safetensors).
    """

    file: str = field(metadata={"positional": True})


@dataclass
class ModelsArgs:
    """`ilf models`: the built-in models and, for each, the feedback weights shipped with it.

    Args:
        name: only this built-in model (default: all).
    """

    name: str | None = None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `ilf` parser. ``train`` and ``bench`` take their flags from modules that import torch: with
    ``command`` given, only that subcommand's flags are added (``ilf --help`` imports no torch)."""
    p = argparse.ArgumentParser(
        prog="ilf", description="Fast DiT / PixArt sampling with Inner Loop Feedback."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cls, short in (
        ("sample", SampleArgs, "sample an image grid"),
        ("eval", EvalCommand, "sample N images per class and measure FID, class accuracy, paired PSNR"),
        ("info", InfoArgs, "print a feedback weights file's metadata"),
        ("models", ModelsArgs, "list the built-in models and the feedback weights shipped with each"),
        ("tune", TuneArgs, "search the ILF schedule that fits a cost budget (successive halving)"),
    ):
        add_dataclass_arguments(
            sub.add_parser(name, help=short, description=cls.__doc__.splitlines()[0].replace("`", "")), cls
        )
    train = sub.add_parser(
        "train",
        help="distil feedback weights from a frozen backbone",
        description="Train the feedback module of an ILF loop by distillation from the frozen backbone; "
        "runs data-parallel under torchrun.",
    )
    bench = sub.add_parser(
        "bench",
        help="speed and quality of ILF against fewer steps and caching methods (benchmarks/compare.py)",
        description="One table, one plot, one grid: ILF, plain samplers and caches on one model, in one run.",
    )
    if command in (None, "train"):
        from ilf_runtime.train.args import add_arguments as add_train_arguments

        add_train_arguments(train)
    if command in (None, "bench"):
        from ilf_runtime.bench import add_arguments as add_bench_arguments

        add_bench_arguments(bench)
    return p


def _command(argv: list[str]) -> str:
    """The subcommand named in `argv` ("" when none: then only the top-level parser is needed)."""
    return next((a for a in argv if not a.startswith("-")), "")


def _weights_defaults(args: argparse.Namespace) -> None:
    """``--weights shipped[:NAME]`` becomes the shipped file's path; without ``--steps`` the step
    count the weights were trained for is used (20 without weights), and without ``--solver`` the
    solver they were distilled for (the model's scheduler without weights)."""
    from ilf_runtime.registry import resolve_weights
    from ilf_runtime.weights import read_metadata

    args.weights = resolve_weights(args.weights, args.model)
    sampler = read_metadata(args.weights).get("sampler") or {} if args.weights else {}
    if args.steps is None:
        args.steps = int(sampler.get("num_steps", 20))
    trained = sampler.get("solver")
    if args.solver is None:
        args.solver = trained
    elif trained and args.solver != trained:
        logger.warning(
            "the feedback weights were distilled for the %s solver; sampling with %s", trained, args.solver
        )


def check_device(device: str | None) -> None:
    """A one-line `UsageError` for a device this torch cannot use (before any model is loaded)."""
    import torch

    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: expected a torch device such as cpu, cuda or cuda:1")
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "is a CPU-only build" if torch.version.cuda is None else "finds no CUDA device"
        raise UsageError(f"--device {device}: this torch ({torch.__version__}) {why}; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(
            f"--device {device}: this machine has CUDA devices 0..{torch.cuda.device_count() - 1}"
        )


def check_writable(path: str | None, flag: str, *, directory: bool = False) -> None:
    """A one-line `UsageError` unless `path` (a file, or with `directory` a folder) can be written:
    checked before any work, so that a bad path does not fail after all the sampling."""
    if path is None:
        return
    p = Path(path)
    if not directory and p.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; expected a file path")
    if directory and p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path}: is a file; expected a directory")
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{flag} {path}: not writable (permission denied or a read-only file system)")
    at = (p if directory else p.parent).absolute()
    while not at.exists():
        at = at.parent
    if not at.is_dir():
        raise UsageError(f"{flag} {path}: {at} is a file, not a directory")
    if not os.access(at, os.W_OK | os.X_OK):
        raise UsageError(
            f"{flag} {path}: cannot write in {at} (permission denied or a read-only file system)"
        )


def cmd_sample(args: SampleArgs) -> int:
    import torch

    from ilf_runtime.fused import apply_fused_blocks
    from ilf_runtime.images import save_grid, save_images
    from ilf_runtime.pipelines import sample
    from ilf_runtime.registry import MODEL_NAMES, load_model

    check_writable(args.out, "--out")
    _check_guidance(args.guidance)
    _weights_defaults(args)
    dtype = getattr(torch, DTYPES[args.dtype])
    if args.cuda_graph and torch.device(args.device).type != "cuda":
        raise UsageError(f"--cuda-graph needs a CUDA device, got --device {args.device}")
    model = load_model(args.model, device=args.device, dtype=dtype)
    if args.fused:
        apply_fused_blocks(model)
    if args.model in MODEL_NAMES:
        print(f"model: {args.model}: {model.note}")
    kw: dict[str, Any] = {}
    n = args.per_class
    adapter = model.adapter
    if adapter.class_conditional:
        if args.prompt or args.prompt_embeds or args.negative_prompt:
            raise UsageError(
                f"this is a class-conditional {adapter.transformer_class}: use --classes, not --prompt"
            )
        num_classes = adapter.num_classes(model.transformer)
        classes = args.classes if args.classes is not None else list(range(min(num_classes, 10)))
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise UsageError(f"--classes {bad}: this model has classes 0..{num_classes - 1}")
        kw["class_labels"] = [c for c in classes for _ in range(n)]
        nrow_labels = classes
    else:
        if args.classes is not None:
            raise UsageError(
                f"this is a text-to-image {adapter.transformer_class}: use --prompt or --prompt-embeds"
            )
        if args.prompt_embeds:
            from ilf_runtime.models import load_prompt_embeds

            d = load_prompt_embeds(args.prompt_embeds)
            for k in (
                "prompt_embeds",
                "prompt_attention_mask",
                "negative_prompt_embeds",
                "negative_prompt_attention_mask",
            ):
                if k in d:
                    kw[k] = d[k].repeat_interleave(n, dim=0)
            nrow_labels = list(range(d["prompt_embeds"].shape[0]))
        elif args.prompt:
            kw["prompts"] = [p for p in args.prompt for _ in range(n)]
            kw["negative_prompt"] = args.negative_prompt
            nrow_labels = args.prompt
        else:
            raise UsageError(f"a {adapter.transformer_class} needs --prompt or --prompt-embeds")
    out = sample(
        model,
        num_steps=args.steps,
        solver=args.solver,
        guidance_scale=args.guidance,
        seed=args.seed,
        ilf=args.weights,
        loop_steps=args.loop_steps,
        batch_size=args.batch_size,
        progress=_show_progress(args),
        cuda_graph=args.cuda_graph,
        **kw,
    )
    by_prompt = isinstance(nrow_labels[0], str)
    if by_prompt:
        labels = [str(x) for x in nrow_labels]
    elif adapter.class_conditional:
        labels = [f"class {c}" for c in nrow_labels]
    else:
        labels = [f"embedding {i}" for i in nrow_labels]
    path = save_grid(out.images, args.out, nrow=n, row_labels=labels)
    info = out.info
    count = len(out.seeds)
    if args.out_dir:
        common = {
            "model": args.model,
            "steps": str(args.steps),
            "solver": str(info["solver"]),
            "guidance": str(info["guidance_scale"]),
            "weights": str(args.weights or "none"),
        }
        key = "prompt" if by_prompt else "label"
        texts = [
            common | {"seed": str(s), key: str(lab)} for s, lab in zip(out.seeds, out.labels, strict=True)
        ]
        written = save_images(out.images, args.out_dir, texts)
        print(f"wrote {_plural(len(written), 'PNG')} with their settings to {args.out_dir}")
    ilf_desc = (
        "off"
        if info["ilf"] is None
        else f"{args.weights} (looped steps {sum(info['loop_mask'])}/{args.steps})"
    )
    print(
        f"wrote {path}: {_plural(count, 'image')}, {_plural(len(nrow_labels), 'row')} x {n} "
        f"({adapter.name}, {info['solver']}, "
        f"{args.steps} steps, guidance {info['guidance_scale']}, ILF {ilf_desc})"
    )
    print(
        f"time {out.seconds:.3f} s, {count / out.seconds:.2f} images/s, "
        f"{info['block_evals_per_image']} block evaluations per image, device {info['device']}, dtype {info['dtype']}"
    )
    return 0


def cmd_info(args: InfoArgs) -> int:
    from ilf_runtime.weights import load_ilf_weights

    w = load_ilf_weights(args.file)
    meta = w.metadata
    print(f"file: {args.file}")
    print(f"format: {meta['format']} v{meta['format_version']}")
    print(f"backbone: {meta['backbone_class']} (fingerprint {meta['backbone_fingerprint'][:16]})")
    bc = meta.get("backbone_config") or {}
    keys = (
        "num_layers",
        "num_attention_heads",
        "attention_head_dim",
        "sample_size",
        "patch_size",
        "in_channels",
    )
    print("backbone config: " + ", ".join(f"{k}={bc[k]}" for k in keys if k in bc))
    print("ilf config: " + json.dumps(meta["ilf_config"], sort_keys=True))
    print("sampler: " + json.dumps(meta.get("sampler") or {}, sort_keys=True))
    print("training: " + json.dumps(meta.get("training") or {}, sort_keys=True))
    n = sum(t.numel() for t in w.tensors.values())
    print(
        f"tensors: {len(w.tensors)} ({n:,} parameters); scales: {w.tensors['scales'].flatten()[:8].tolist()}"
    )
    return 0


def shipped_summary(path: str | Path) -> str:
    """One line on what a shipped weights file targets: solver, steps (and grid), looped steps, block
    evaluations per image and the validation gain over plain sampling at equal cost."""
    from ilf_runtime.weights import read_metadata

    meta = read_metadata(path)
    s, v = meta.get("sampler") or {}, (meta.get("training") or {}).get("validation") or {}
    text = (
        f"{s.get('solver') or 'model scheduler'}, {s.get('num_steps', '?')} steps"
        + (f" on the grid {s['grid']}" if s.get("grid") else "")
        + f", loop {s.get('loop_steps') or meta['ilf_config'].get('loop_steps')}"
    )
    if s.get("guidance_scale") not in (None, 1.0):
        text += f", guidance {s['guidance_scale']}"
    if v.get("block_evals") is not None:
        text += f", {v['block_evals']} block evals/image"
    if v.get("gain_db") is not None:
        text += (
            f"; validation: {v['psnr']:.2f} dB vs the {s.get('teacher_steps', 20)}-step images, "
            f"{v['gain_db']:+.2f} ± {v['gain_se']:.2f} dB over plain {v['equal_cost_steps']} steps (equal cost)"
        )
    return text


def cmd_models(args: ModelsArgs) -> int:
    from ilf_runtime.registry import MODEL_NAMES, shipped_weights

    names = [args.name] if args.name else list(MODEL_NAMES)
    for name in names:
        if name not in MODEL_NAMES:
            raise UsageError(f"no built-in model {name!r}; built-in: {', '.join(MODEL_NAMES)}")
        where, desc = MODEL_NAMES[name]
        print(f"{name}: {desc}")
        if not callable(where):
            print(f"  folder: {where}" + ("" if (Path(where) / "config.json").is_file() else " (missing)"))
        files = shipped_weights(name)
        for key, f in files.items():
            flag = "shipped" if key == "default" else f"shipped:{key}"
            print(f"  --weights {flag}: {f.name}: {shipped_summary(f)}")
        if not files:
            print("  no shipped feedback weights")
    return 0


def cmd_eval(args: EvalCommand) -> int:
    from ilf_runtime.fashion.evaluate import evaluate, markdown_row, write_results
    from ilf_runtime.fused import apply_fused_blocks
    from ilf_runtime.registry import load_model

    check_writable(args.out + ".json", "--out")
    _weights_defaults(args)
    a = EvalArgs(**{f.name: getattr(args, f.name) for f in fields(EvalArgs)})
    model = load_model(args.model)
    if args.fused:
        apply_fused_blocks(model)
    if not model.adapter.class_conditional:
        return _eval_prompts(model, a, args)
    result = evaluate(model, a, progress=_show_progress(args))
    write_results([result], args.out)
    f = result["fid"]
    print(
        f"FID {f['fid']:.3f} (subsets {f['subset_mean']:.3f} +- {f['subset_std']:.3f}), "
        f"floor {result['fid_floor']['fid']:.3f}, class accuracy {100 * result['class_accuracy']:.1f}%"
    )
    if "paired_vs_ref" in result:
        p = result["paired_vs_ref"]
        print(
            f"paired PSNR vs {p['ref_steps']} steps: {p['psnr']:.2f} +- {p['psnr_se']:.2f} dB, MAE {p['mae']:.4f}"
        )
    print(markdown_row(result))
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0


def _eval_prompts(model: Any, a: EvalArgs, args: EvalCommand) -> int:
    from ilf_runtime.fashion.evaluate import write_results
    from ilf_runtime.fashion.evaluate_prompts import (
        PROMPT_MARKDOWN_HEADER,
        evaluate_prompts,
        prompt_markdown_row,
    )

    r = evaluate_prompts(model, a, progress=_show_progress(args))
    write_results([r], args.out, prompt_markdown_row, PROMPT_MARKDOWN_HEADER)
    acc = r["accuracy"]
    line = ", ".join(
        f"{k} {100 * acc['all'][k]['acc']:.1f} +- {100 * acc['all'][k]['se']:.1f}%"
        for k in ("class", "colour", "full")
    )
    print(f"prompt accuracy ({r['n']} images): {line}")
    print(
        f"full prompt: held-out pairs {100 * acc['held_out']['full']['acc']:.1f}%, ceiling "
        f"{100 * r['ceiling']['all']['full']['acc']:.1f}%, shuffled prompts {100 * r['shuffled']['full']['acc']:.1f}%"
    )
    f = r["fid"]
    print(
        f"FID {f['fid']:.3f} (subsets {f['subset_mean']:.3f} +- {f['subset_std']:.3f}), floor {r['fid_floor']['fid']:.3f}"
    )
    if "paired_vs_ref" in r:
        p = r["paired_vs_ref"]
        print(f"paired PSNR vs {p['ref_steps']} steps: {p['psnr']:.2f} +- {p['psnr_se']:.2f} dB")
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ilf_runtime.registry import load_model
    from ilf_runtime.train import args_from_namespace, main

    a = args_from_namespace(args)
    check_writable(a.out, "--out", directory=True)
    check_writable(a.bank_cache, "--bank-cache", directory=True)
    result = main(a, load_model(a.model))
    if "weights" in result:
        v = result.get("validation") or {}
        print(f"wrote {result['weights']} after {result['step']} steps ({result['seconds']:.0f} s)")
        if v:
            print(
                f"validation: {v['psnr']:.2f} dB vs the teacher, {v['gain_db']:+.2f} +- {v['gain_se']:.2f} dB "
                f"over plain {v['equal_cost_steps']} steps"
            )
    elif "stopped" in result:
        print(f"stopped at step {result['step']} ({result['stopped']}); continue with --resume")
        return 130 if result["stopped"] == "signal" else 0
    return 0


def cmd_tune(a: TuneArgs) -> int:
    from ilf_runtime.registry import load_model
    from ilf_runtime.tune import describe, main

    _check_guidance(a.guidance)
    check_writable(a.out, "--out", directory=True)
    result = main(a, load_model(a.model))
    if result["is_main"]:  # under torchrun, one report
        print("\n".join(describe(result)))
    return 130 if result.get("stopped") == "signal" else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ilf_runtime.bench import main_from_args

    if not args.report_only:
        check_writable(args.out + ".json", "--out")
    _check_guidance(args.guidance)
    return main_from_args(args)


def _show_progress(args: Any) -> bool:
    """Progress bars only where someone watches: asked for, and stderr is a terminal."""
    return args.progress and sys.stderr.isatty()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _check_guidance(g: float | None) -> None:
    if g is not None and not guidance_ok(g):
        raise UsageError(f"--guidance {g}: expected a finite number >= 0 (<= 1: unguided)")


# subcommand -> (handler, arguments dataclass or None when the handler takes the namespace)
COMMANDS = {
    "sample": (cmd_sample, SampleArgs),
    "eval": (cmd_eval, EvalCommand),
    "info": (cmd_info, InfoArgs),
    "models": (cmd_models, ModelsArgs),
    "train": (cmd_train, None),
    "bench": (cmd_bench, None),
    "tune": (cmd_tune, TuneArgs),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    from ilf_runtime.weights import WeightsError

    handler, cls = COMMANDS[args.command]
    try:
        check_device(getattr(args, "device", None))
        return handler(args if cls is None else from_namespace(cls, args))
    except (UsageError, WeightsError, ValueError, OSError, RuntimeError, FloatingPointError) as e:
        parser.exit(2, f"ilf {args.command}: error: {' '.join(str(e).split())}\n")  # one line
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
