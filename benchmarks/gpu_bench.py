"""GPU timings at real model sizes with random weights, and per-kernel bandwidth (run by gpu_check.sh).

For each model (DiT-XL/2 at 256 px, batch 1 and 8; PixArt-Sigma at 512 and 1024 px, batch 1; random
weights, since speed does not depend on them) it times, with classifier-free guidance:

    a  diffusers' own pipeline loop, 20 steps, eager (DiTPipeline / PixArtSigmaPipeline built from the
       random transformer and a scheduler; no VAE and no text encoder: the DiT pipeline gets a
       pass-through VAE stub, PixArt gets random prompt embeddings and returns latents)
    b  this runtime's loop (`sampling.denoise`), 20 steps, eager
    c  b with the fused blocks (`apply_fused_blocks`)
    d  c as one CUDA graph (`cuda_graph=True`)
    e  ILF at 10 steps with c and d: random feedback block, nonzero scales, loop blocks 8..19 on the
       last 4 steps = 10 * 28 + 4 * 13 = 332 block evaluations per image, the paper's PixArt cost
       (560 for 20 plain steps)

Each row: warm-up (which also captures the graph), then `--reps` runs timed with CUDA events; the
median is reported. Checks in the same run: d equals c bit for bit; c is within the fp tolerance
of b. The kernel table times every `torch.ops.ilf` op against its eager reference and reports the
achieved bandwidth against a measured device-to-device copy.

    python benchmarks/gpu_bench.py --out OUTDIR              # on a GPU machine
    python benchmarks/gpu_bench.py --tiny --device cpu --out /tmp/x --reps 1   # smoke test, CPU

Writes OUTDIR/gpu_bench_<card>.json and .md (device name, versions, commit in both); copy them to
benchmarks/results/ to keep them.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ILF_LOOP = {"loop_start": 8, "loop_end": 19, "loop_steps": "last:4"}  # 332 block evals at 10 steps
ILF_LOOP_TINY = {"loop_start": 1, "loop_end": 2, "loop_steps": "last:2"}


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "dit" or "pixart"
    batch: int
    config: dict[str, Any]  # the transformer's constructor arguments
    text_tokens: int = 0  # PixArt prompt length


def _dit(sample_size: int, **kw: Any) -> dict[str, Any]:
    cfg = {  # DiT-XL/2 (diffusers' DiTTransformer2DModel defaults, spelled out)
        "num_attention_heads": 16,
        "attention_head_dim": 72,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": 28,
        "sample_size": sample_size,
        "patch_size": 2,
        "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_zero",
    }
    return {**cfg, **kw}


def _pixart(sample_size: int, **kw: Any) -> dict[str, Any]:
    cfg = {  # PixArt-Sigma (XL/2 backbone, T5-XXL captions)
        "num_attention_heads": 16,
        "attention_head_dim": 72,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": 28,
        "cross_attention_dim": 1152,
        "caption_channels": 4096,
        "sample_size": sample_size,
        "patch_size": 2,
        "norm_type": "ada_norm_single",
        "interpolation_scale": max(1, sample_size // 64),
    }
    return {**cfg, **kw}


def cases(tiny: bool) -> list[Case]:
    if tiny:  # the same code paths at test sizes
        small = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 4}
        return [
            Case("dit-tiny-b2", "dit", 2, _dit(8, **small)),
            Case(
                "pixart-tiny-b1",
                "pixart",
                1,
                _pixart(8, **small, cross_attention_dim=16, caption_channels=12),
                6,
            ),
        ]
    return [
        Case("dit-xl2-256-b1", "dit", 1, _dit(32)),
        Case("dit-xl2-256-b8", "dit", 8, _dit(32)),
        Case("pixart-sigma-512-b1", "pixart", 1, _pixart(64), 300),
        Case("pixart-sigma-1024-b1", "pixart", 1, _pixart(128), 300),
    ]


# ---------------------------------------------------------------------------------------------
# timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Per-run milliseconds: CUDA events on a GPU, perf_counter on the CPU (smoke tests)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append(1e3 * (time.perf_counter() - t0))
    return out


# ---------------------------------------------------------------------------------------------
# models and the five loops


class _LatentVAE:
    """Stands in for the VAE of DiTPipeline, which always decodes: returns the latents unchanged (not
    a module, so that the pipeline takes its device from the transformer)."""

    config = SimpleNamespace(scaling_factor=1.0)

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=z)


def build(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A randomly initialised transformer, built directly on `device`."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    cls = DiTTransformer2DModel if case.kind == "dit" else PixArtTransformer2DModel
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        model = cls(**case.config)
    return model.to(dtype=dtype).eval()


def scheduler(kind: str) -> Any:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if kind == "dit":  # DiT-XL-2-256's DDIM on the linear schedule
        return DDIMScheduler(beta_schedule="linear", clip_sample=False)
    return DPMSolverMultistepScheduler()  # PixArt-Sigma's DPM-Solver++ (2M)


def prompts(case: Case, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    shape = (case.batch, case.text_tokens, case.config["caption_channels"])
    emb, neg = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
    mask = torch.ones(shape[:2], dtype=torch.long, device=device)
    return emb, mask, neg, mask.clone()


def diffusers_loop(case: Case, model: nn.Module, steps: int) -> Callable[[], Any]:
    """(a): the pipeline's own __call__, latents out."""
    from diffusers import DiTPipeline, PixArtSigmaPipeline

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    if case.kind == "dit":
        pipe = DiTPipeline(transformer=model, vae=_LatentVAE(), scheduler=scheduler("dit"))
        labels = [i % 1000 for i in range(case.batch)]
        kw = {"class_labels": labels, "output_type": "pt"}
    else:
        pipe = PixArtSigmaPipeline(
            tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=scheduler("pixart")
        )
        emb, mask, neg, nmask = prompts(case, device, dtype)
        size = case.config["sample_size"] * 8
        kw = {
            "prompt": None,
            "negative_prompt": None,
            "prompt_embeds": emb,
            "prompt_attention_mask": mask,
            "negative_prompt_embeds": neg,
            "negative_prompt_attention_mask": nmask,
            "height": size,
            "width": size,
            "output_type": "latent",
            "use_resolution_binning": False,
        }
    pipe.set_progress_bar_config(disable=True)
    from ilf_runtime.models import adapter_for

    guidance = adapter_for(model).default_guidance  # the pipelines' own defaults

    def run() -> Any:
        with torch.no_grad():
            return pipe(guidance_scale=guidance, num_inference_steps=steps, **kw)

    return run


def runtime_loop(case: Case, model: nn.Module, steps: int, mask: list[bool] | None, graph: bool):
    """(b)-(e): this runtime's denoise; returns a callable giving the latents."""
    from ilf_runtime.models import PROMPT_KEYS, adapter_for
    from ilf_runtime.sampling import denoise, make_noise
    from ilf_runtime.solvers import make_solver

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    solver = make_solver(scheduler(case.kind), steps, device=device)
    c = case.config
    noise = make_noise(
        range(case.batch), (c["in_channels"], c["sample_size"], c["sample_size"]), device=device
    )
    noise = noise.to(dtype)
    adapter = adapter_for(model)
    if adapter.class_conditional:
        cond = adapter.conditioning(model, class_labels=torch.tensor([i % 1000 for i in range(case.batch)]))
    else:
        size = c["sample_size"] * 8
        items = dict(zip(PROMPT_KEYS, prompts(case, device, dtype)))
        cond = adapter.conditioning(model, height=size, width=size, **items)
    g = adapter.default_guidance
    return lambda: denoise(model, noise, solver, cond, guidance_scale=g, loop_mask=mask, cuda_graph=graph)


def bench_case(
    case: Case, device: torch.device, dtype: torch.dtype, warmup: int, reps: int
) -> dict[str, Any]:
    from ilf_runtime import ILFConfig, apply_ilf, graphs
    from ilf_runtime.fused import apply_fused_blocks

    model = build(case, device, dtype)
    layers = case.config["num_layers"]
    graph_ok = device.type == "cuda"
    rows: dict[str, Any] = {}

    def row(label: str, fn: Callable[[], Any], steps: int, evals: int) -> Any:
        ms = time_ms(fn, device, warmup, reps)
        rows[label] = {"ms": statistics.median(ms), "runs_ms": ms, "steps": steps, "block_evals": evals}
        return fn()

    row("a", diffusers_loop(case, model, 20), 20, 20 * layers)
    out_b = row("b", runtime_loop(case, model, 20, None, False), 20, 20 * layers)
    apply_fused_blocks(model)
    out_c = row("c", runtime_loop(case, model, 20, None, False), 20, 20 * layers)
    checks = {"c_vs_b_max_abs": (out_c.float() - out_b.float()).abs().max().item()}
    if graph_ok:
        out_d = row("d", runtime_loop(case, model, 20, None, True), 20, 20 * layers)
        checks["d_equals_c"] = bool(torch.equal(out_d, out_c))
    cfg = ILFConfig(**(ILF_LOOP if layers == 28 else ILF_LOOP_TINY))
    loop = apply_ilf(model, cfg)  # after fusing: its feedback block is fused too
    with torch.no_grad():
        loop.scales.copy_(
            0.1 + 0.05 * torch.randn(loop.scales.shape, generator=torch.Generator().manual_seed(2))
        )
    mask = cfg.step_mask(10)
    out_e = row("e", runtime_loop(case, model, 10, mask, graph_ok), 10, cfg.block_evals(layers, 10))
    if graph_ok:
        checks["e_graph_equals_eager"] = bool(
            torch.equal(out_e, runtime_loop(case, model, 10, mask, False)())
        )
    graphs.clear_graphs(model)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"case": asdict(case), "rows": rows, "checks": checks, "ilf": cfg.to_dict()}


# ---------------------------------------------------------------------------------------------
# kernels


def kernel_cases(tiny: bool) -> list[tuple[str, tuple[int, int, int]]]:
    sizes = [(2, 4, 16)] if tiny else [(2, 256, 1152), (2, 4096, 1152), (16, 4096, 1152)]
    return [
        (op, s)
        for s in sizes
        for op in (
            "ada_layernorm",
            "ada_layernorm_table",
            "gated_residual",
            "gated_inject",
            "feedback_inject",
        )
    ]


def kernel_args(op: str, shape: tuple[int, int, int], device, dtype) -> tuple[Callable, Callable, tuple, int]:
    """(ext op, reference, args, bytes moved by one pass) for one kernel case."""
    from ilf_runtime import ops

    b, t, d = shape
    g = torch.Generator().manual_seed(0)

    def r(*s: int) -> torch.Tensor:
        return torch.randn(s, generator=g).to(device, dtype)

    x, y, f = r(b, t, d), r(b, t, d), r(b, t, d)
    emb = r(b, 6 * d)  # a block's modulation, chunks of (B, D) with row stride 6 D
    chunk = list(emb.chunk(6, dim=1))
    table = r(6, d)
    act = x.numel() * x.element_size()
    if op == "ada_layernorm":
        return torch.ops.ilf.ada_layernorm, ops.ada_layernorm_ref, (x, chunk[0], chunk[1], 1e-6), 2 * act
    if op == "ada_layernorm_table":
        args = (x, chunk[0], chunk[1], 1e-6, table[0], table[1])
        return torch.ops.ilf.ada_layernorm, ops.ada_layernorm_ref, args, 2 * act
    if op == "gated_residual":
        return torch.ops.ilf.gated_residual, ops.gated_residual_ref, (x, chunk[2], y), 3 * act
    if op == "gated_inject":
        args = (x, chunk[5], y, None, f, r(d))
        return torch.ops.ilf.gated_residual, ops.gated_residual_ref, args, 4 * act
    return torch.ops.ilf.feedback_inject, ops.feedback_inject_ref, (x, f, r()), 3 * act


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy (bytes read + written), median of 20."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(time_ms(lambda: dst.copy_(src), device, 3, 20))
    return 2 * nbytes / ms / 1e6


def bench_kernels(device: torch.device, dtype: torch.dtype, tiny: bool, reps: int) -> dict[str, Any]:
    from ilf_runtime.ext import ext_status

    st = ext_status()
    if device.type != "cuda" or not st["cuda_ops"]:
        return {"skipped": f"needs CUDA and the extension's CUDA kernels (ext_status: {st['reason'] or st})"}
    copy = copy_bandwidth(device)
    out = []
    for op, shape in kernel_cases(tiny):
        ext, ref, args, nbytes = kernel_args(op, shape, device, dtype)
        ms_ext, ms_ref = (
            statistics.median(time_ms(functools.partial(fn, *args), device, 5, max(reps, 20)))
            for fn in (ext, ref)
        )
        gbs = nbytes / ms_ext / 1e6
        out.append(
            {"op": op, "shape": shape, "ms_ext": ms_ext, "ms_ref": ms_ref, "speedup": ms_ref / ms_ext,
             "gb_s": gbs, "of_copy": gbs / copy}
        )  # fmt: skip
    return {"copy_gb_s": copy, "kernels": out}


# ---------------------------------------------------------------------------------------------
# report


def context(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import diffusers

    from ilf_runtime.ext import ext_status

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "commit": commit.stdout.strip() or "unknown",
        "ext": ext_status(),
    }


def markdown(result: dict[str, Any]) -> str:
    ctx = result["context"]
    lines = [
        f"# GPU benchmark: {ctx['device']}",
        "",
        (
            f"{ctx['dtype']}, torch {ctx['torch']} (CUDA {ctx['cuda']}), diffusers {ctx['diffusers']}, commit "
            f"{ctx['commit']}; medians of {result['args']['reps']} runs after {result['args']['warmup']} warm-up "
            "(CUDA events on a GPU). Random weights; no VAE, no text encoder (latents out, random prompt "
            "embeddings); classifier-free guidance on."
        ),
        "",
        (
            "Rows: a diffusers pipeline loop (20 steps, eager), b this runtime's loop (20 steps), c + fused "
            "blocks, d + CUDA graph, e ILF 10 steps with c and d (ILF config per model in the JSON; at 28 "
            f"blocks: loop {ILF_LOOP['loop_start']}..{ILF_LOOP['loop_end']} on steps {ILF_LOOP['loop_steps']}, "
            "random feedback block, scales about 0.1)."
        ),
        "",
        "| model | row | steps | block evals | ms | vs a | vs previous row |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result["cases"]:
        rows = c["rows"]
        prev = None
        for label, r in rows.items():
            vs_a = rows["a"]["ms"] / r["ms"]
            vs_prev = f"{rows[prev]['ms'] / r['ms']:.2f}x" if prev else ""
            lines.append(
                f"| {c['case']['name']} | {label} | {r['steps']} | {r['block_evals']} | {r['ms']:.2f} | "
                f"{vs_a:.2f}x | {vs_prev} |"
            )
            prev = label
        lines.append(f"| {c['case']['name']} | checks | {json.dumps(c['checks'])} | | | | |")
    k = result["kernels"]
    lines += ["", "## Kernels", ""]
    if "skipped" in k:
        lines.append(f"skipped: {k['skipped']}")
    else:
        lines += [
            f"Device-to-device copy: {k['copy_gb_s']:.0f} GB/s (bytes read + written).",
            "",
            "| op | (B, T, D) | ext us | eager ref us | speed-up | GB/s | of copy |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in k["kernels"]:
            lines.append(
                f"| {r['op']} | {tuple(r['shape'])} | {1e3 * r['ms_ext']:.1f} | {1e3 * r['ms_ref']:.1f} | "
                f"{r['speedup']:.2f}x | {r['gb_s']:.0f} | {100 * r['of_copy']:.0f}% |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory for gpu_bench.json / .md")
    p.add_argument("--device", default="cuda", help="torch device (default cuda)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per row (the first captures graphs)")
    p.add_argument("--reps", type=int, default=5, help="timed runs per row")
    p.add_argument("--only", help="comma-separated case names (default all)")
    p.add_argument("--tiny", action="store_true", help="tiny models and kernel sizes (smoke test)")
    p.add_argument("--skip-kernels", action="store_true")
    args = p.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --tiny --device cpu for a smoke test)")
    todo = cases(args.tiny)
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {c.name for c in todo}
        if unknown:
            raise SystemExit(f"unknown --only cases {sorted(unknown)}; known: {[c.name for c in todo]}")
        todo = [c for c in todo if c.name in names]
    result: dict[str, Any] = {"context": context(device, dtype), "args": vars(args), "cases": []}
    for case in todo:
        print(f"[gpu_bench] {case.name}", flush=True)
        result["cases"].append(bench_case(case, device, dtype, args.warmup, args.reps))
    result["kernels"] = (
        {"skipped": "--skip-kernels"}
        if args.skip_kernels
        else bench_kernels(device, dtype, args.tiny, args.reps)
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_bench_" + (
        re.sub(r"[^a-z0-9]+", "-", result["context"]["device"].lower()).strip("-") or "device"
    )
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
