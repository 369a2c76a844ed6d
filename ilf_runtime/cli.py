"""The `ilf` command line: `ilf sample`, `ilf eval`, `ilf bench`, `ilf info`, `ilf train`.

Flags map onto the keyword arguments of `ilf_runtime.sample`. Errors in the arguments or in the
inputs (missing model, bad weights file, wrong labels) end with a one-line message and exit code 2,
not a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from typing import Any

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit code 2."""


def _int_list(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ilf", description="Fast DiT / PixArt sampling with Inner Loop Feedback."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("sample", help="sample an image grid", description="Sample images into a PNG grid.")
    s.add_argument(
        "--model", required=True, help="model directory (diffusers pipeline or transformer) or built-in name"
    )
    s.add_argument(
        "--weights",
        help="feedback weights file (.safetensors) to apply, or shipped[:NAME] for a built-in model's own",
    )
    s.add_argument(
        "--classes", type=_int_list, help="DiT class ids, e.g. 0,1,2 (default: all classes, up to 10)"
    )
    s.add_argument("--per-class", type=_positive, default=4, help="images per class or prompt (default 4)")
    s.add_argument("--prompt", action="append", help="PixArt prompt (repeatable)")
    s.add_argument(
        "--prompt-embeds", help="safetensors file with prompt_embeds [, prompt_attention_mask, negative_*]"
    )
    s.add_argument("--steps", type=_positive, help="solver steps (default: the weights file's, else 20)")
    s.add_argument(
        "--solver",
        choices=["ddim", "dpmpp_2m"],
        help="default: the weights file's, else the model's scheduler",
    )
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the pipeline's)")
    s.add_argument("--seed", type=int, default=0, help="first noise seed; image i uses seed + i")
    s.add_argument(
        "--loop-steps", help="steps that run the loop: all, none, first:K, last:K, every:K or 5,7,9"
    )
    s.add_argument("--batch-size", type=_positive, help="images per forward batch (default all)")
    s.add_argument("--device", default="cpu", help="torch device (default cpu)")
    s.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    s.add_argument("--out", default="samples.png", help="output PNG grid (default samples.png)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument(
        "--cuda-graph",
        action="store_true",
        help="run each batch's denoising loop as one CUDA graph (CUDA only)",
    )

    e = sub.add_parser(
        "eval",
        help="sample N images per class and measure FID, class accuracy, paired PSNR",
        description="Evaluate a 10-class pixel-space DiT with the shipped Fashion-MNIST classifier.",
    )
    e.add_argument(
        "--model", default="fashion-dit", help="model directory or built-in name (default fashion-dit)"
    )
    e.add_argument("--weights", help="feedback weights file (.safetensors), or shipped[:NAME]")
    e.add_argument("--per-class", type=_positive, default=100, help="images per class (default 100)")
    e.add_argument("--steps", type=_positive, help="solver steps (default: the weights file's, else 20)")
    e.add_argument(
        "--solver",
        choices=["ddim", "dpmpp_2m"],
        help="default: the weights file's, else the model's scheduler",
    )
    e.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--loop-steps")
    e.add_argument(
        "--ref-steps", type=int, default=0, help="paired PSNR against the plain sampler at N steps (0: off)"
    )
    e.add_argument(
        "--subsets", type=_positive, default=5, help="disjoint subsets for the FID spread (default 5)"
    )
    e.add_argument("--batch-size", type=_positive, default=250)
    e.add_argument("--out", default="eval", help="output path stem: writes STEM.json and STEM.md")
    e.add_argument("--no-progress", action="store_true")

    from ilf_runtime.train import add_arguments as add_train_arguments

    t = sub.add_parser(
        "train",
        help="distil feedback weights from a frozen backbone",
        description="Train the feedback module of an ILF loop by distillation from the frozen backbone; "
        "runs data-parallel under torchrun.",
    )
    add_train_arguments(t)

    from ilf_runtime.bench import add_arguments

    b = sub.add_parser(
        "bench",
        help="speed and quality of ILF against fewer steps and caching methods (benchmarks/compare.py)",
        description="One table, one plot, one grid: ILF, plain samplers and caches on one model, in one run.",
    )
    add_arguments(b)

    i = sub.add_parser("info", help="print a feedback weights file's metadata")
    i.add_argument("file", help="feedback weights file (.safetensors)")
    return p


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


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from ilf_runtime.images import save_grid
    from ilf_runtime.pipelines import sample
    from ilf_runtime.registry import MODEL_NAMES, load_model

    _weights_defaults(args)
    dtype = getattr(torch, DTYPES[args.dtype])
    if args.cuda_graph and torch.device(args.device).type != "cuda":
        raise UsageError(f"--cuda-graph needs a CUDA device, got --device {args.device}")
    model = load_model(args.model, device=args.device, dtype=dtype)
    if args.model in MODEL_NAMES:
        print(f"model: {args.model}: {model.note}")
    kw: dict[str, Any] = {}
    n = args.per_class
    adapter = model.adapter
    if adapter.class_conditional:
        if args.prompt or args.prompt_embeds:
            raise UsageError(f"this is a class-conditional {adapter.transformer_class}: use --classes, not --prompt")
        num_classes = adapter.num_classes(model.transformer)
        classes = args.classes if args.classes is not None else list(range(min(num_classes, 10)))
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise UsageError(f"--classes {bad}: this model has classes 0..{num_classes - 1}")
        kw["class_labels"] = [c for c in classes for _ in range(n)]
        nrow_labels = classes
    else:
        if args.classes is not None:
            raise UsageError(f"this is a text-to-image {adapter.transformer_class}: use --prompt or --prompt-embeds")
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
        progress=not args.no_progress,
        cuda_graph=args.cuda_graph,
        **kw,
    )
    path = save_grid(out.images, args.out, nrow=n)
    info = out.info
    count = len(out.seeds)
    ilf_desc = (
        "off"
        if info["ilf"] is None
        else f"{args.weights} (looped steps {sum(info['loop_mask'])}/{args.steps})"
    )
    print(
        f"wrote {path}: {count} images, {len(nrow_labels)} rows x {n} ({adapter.name}, {info['solver']}, "
        f"{args.steps} steps, guidance {info['guidance_scale']}, ILF {ilf_desc})"
    )
    print(
        f"time {out.seconds:.3f} s, {count / out.seconds:.2f} images/s, "
        f"{info['block_evals_per_image']} block evaluations per image, device {info['device']}, dtype {info['dtype']}"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
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


def cmd_eval(args: argparse.Namespace) -> int:
    from ilf_runtime.fashion.evaluate import EvalArgs, evaluate, markdown_row, write_results
    from ilf_runtime.registry import load_model

    _weights_defaults(args)
    a = EvalArgs(**{f.name: getattr(args, f.name) for f in fields(EvalArgs)})
    result = evaluate(load_model(args.model), a, progress=not args.no_progress)
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


def cmd_train(args: argparse.Namespace) -> int:
    from ilf_runtime.train import args_from_namespace, main

    result = main(args_from_namespace(args))
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


def cmd_bench(args: argparse.Namespace) -> int:
    from ilf_runtime.bench import main_from_args

    return main_from_args(args)


COMMANDS = {"sample": cmd_sample, "info": cmd_info, "eval": cmd_eval, "bench": cmd_bench, "train": cmd_train}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    from ilf_runtime.weights import WeightsError

    try:
        return COMMANDS[args.command](args)
    except (UsageError, WeightsError, ValueError, FileNotFoundError, RuntimeError, FloatingPointError) as e:
        parser.exit(2, f"ilf {args.command}: error: {e}\n")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
