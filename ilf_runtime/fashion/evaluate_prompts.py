"""`ilf eval` of the text-to-image demo: sample N images per (class, colour) prompt and measure how
well they follow it.

The prompts are the plain captions of all 60 (class, colour) pairs ("a red sneaker"), interleaved so
that every disjoint FID subset holds every pair; the pairs of `captions.HELD_OUT` (never seen in
training) are also reported apart. Reported: class, colour and full-prompt accuracy with standard
errors (`prompt_metric`), their ceiling (rendered test-split garments of the same pairs) and the
shuffled-prompt control; FID of the garments' intensity (their shape; colour is what colour accuracy
measures) against the Fashion-MNIST test split, with its spread and floor; paired PSNR against the
plain sampler at ``ref_steps``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ilf_runtime.fashion.captions import COLOURS, HELD_OUT, caption
from ilf_runtime.fashion.classifier import load_fashion_classifier
from ilf_runtime.fashion.evaluate import EvalArgs, paired_vs_ref, reference_sets, run_context, run_summary
from ilf_runtime.fashion.prompt_metric import prompt_accuracy, shuffled
from ilf_runtime.fashion.scenes import CaptionedSet
from ilf_runtime.metrics import extract, fid_with_spread

__all__ = [
    "PROMPT_MARKDOWN_HEADER",
    "eval_prompts",
    "evaluate_prompts",
    "prompt_markdown_row",
    "unsupported_reason",
]


def unsupported_reason(model: Any) -> str | None:
    """Why the prompt metric does not fit `model` (a `registry.Model`), or None when it does: a
    text-conditioned, 3-channel, pixel-space model with a text encoder."""
    c = model.transformer.config
    pipe = model.pipeline
    if model.adapter.class_conditional or c.in_channels != 3 or model.vae is not None:
        return f"the prompt metric needs a 3-channel pixel-space text-to-image model; this is a {model.adapter.name} model"
    if pipe is None or getattr(pipe, "text_encoder", None) is None:
        return "the prompt metric needs the model's text encoder (a pipeline with one)"
    return None


def eval_prompts(per_prompt: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(prompts, classes, colours): the plain caption of every (class, colour) pair, `per_prompt`
    times, pairs interleaved."""
    pairs = [(c, k) for c in range(10) for k in range(len(COLOURS))]
    pairs = pairs * per_prompt
    classes = torch.tensor([c for c, _ in pairs])
    colours = torch.tensor([k for _, k in pairs])
    return [caption(c, k, plain=True) for c, k in pairs], classes, colours


def _split(acc_fn, images, prompts, held: torch.Tensor) -> dict[str, Any]:
    out = {"all": acc_fn(images, prompts)}
    for name, sel in (("seen", ~held), ("held_out", held)):
        idx = sel.nonzero().flatten().tolist()
        out[name] = acc_fn(images[idx], [prompts[i] for i in idx])
    return out


def evaluate_prompts(model: Any, a: EvalArgs, *, progress: bool = True) -> dict[str, Any]:
    """Samples `per_class` images of every (class, colour) prompt and returns the metrics (JSON-able)."""

    from ilf_runtime.models import PROMPT_KEYS, encode_prompts
    from ilf_runtime.pipelines import sample
    from ilf_runtime.registry import to_model

    m = to_model(model)
    reason = unsupported_reason(m)
    if reason:
        raise ValueError(reason)
    if a.guidance is None:
        a = replace(a, guidance=m.guidance)
    prompts, classes, colours = eval_prompts(a.per_class)
    n = len(prompts)
    if a.subsets < 1 or n < 2 * a.subsets:
        raise ValueError("need at least two images per FID subset")
    unique = sorted(set(prompts))
    enc = dict(zip(PROMPT_KEYS, encode_prompts(m, unique, "", a.guidance > 1)))
    rows = torch.tensor([unique.index(p) for p in prompts])
    items = {k: v[rows] for k, v in enc.items() if v is not None}
    seeds = list(range(a.seed, a.seed + n))
    common = {"seeds": seeds, "solver": a.solver, "guidance_scale": a.guidance, "batch_size": a.batch_size}
    common |= {"progress": progress, **items}
    out = sample(m, num_steps=a.steps, ilf=a.weights, loop_steps=a.loop_steps, **common)
    images = out.images
    held = torch.tensor([(int(c), int(k)) in HELD_OUT for c, k in zip(classes, colours)])
    clf = load_fashion_classifier()
    truth = CaptionedSet("test").render(classes, colours, torch.Generator().manual_seed(a.seed))
    sets = reference_sets(n, a.subsets, a.seed)
    feats = extract(clf.features, images.amax(1, keepdim=True))  # the garments' intensity
    result: dict[str, Any] = {
        "kind": "prompts",
        **run_summary(m, a, out),
        "accuracy": _split(lambda x, p: prompt_accuracy(x, p, clf), images, prompts, held),
        "ceiling": _split(lambda x, p: prompt_accuracy(x, p, clf), (truth + 1) / 2, prompts, held),
        "shuffled": prompt_accuracy(images, shuffled(prompts, a.seed), clf),
        "fid": fid_with_spread(feats, sets["ref"], a.subsets),
        "fid_floor": sets["floor"],
        "fid_features": "shipped Fashion-MNIST classifier on the intensity (largest channel)",
        "context": run_context(m),
    }
    if a.ref_steps:
        result["paired_vs_ref"] = paired_vs_ref(
            images, sample(m, num_steps=a.ref_steps, **common).images, a.ref_steps
        )
    return result


def _pct(d: dict[str, float]) -> str:
    return f"{100 * d['acc']:.1f} ± {100 * d['se']:.1f}%"


def prompt_markdown_row(r: dict[str, Any]) -> str:
    a, f, acc = r["args"], r["fid"], r["accuracy"]
    psnr = r.get("paired_vs_ref")
    ps = f"{psnr['psnr']:.2f} ± {psnr['psnr_se']:.2f}" if psnr else "-"
    return (
        f"| {r['model']} | {r['solver']} | {a['steps']} | {a['guidance']} | {a['weights'] or '-'} | {r['n']} | "
        f"{_pct(acc['all']['class'])} | {_pct(acc['all']['colour'])} | {_pct(acc['all']['full'])} | "
        f"{_pct(acc['held_out']['full'])} | {_pct(r['ceiling']['all']['full'])} | {_pct(r['shuffled']['full'])} | "
        f"{f['fid']:.3f} ({f['subset_mean']:.2f} ± {f['subset_std']:.2f}) | {r['fid_floor']['fid']:.3f} | {ps} | "
        f"{r['images_per_s']:.1f} |"
    )


PROMPT_MARKDOWN_HEADER = (
    "| model | solver | steps | guidance | weights | n | class acc | colour acc | full-prompt acc | "
    "full, held-out pairs | full, ceiling | full, shuffled prompts | FID (subset mean ± std) | FID floor | "
    "PSNR vs ref (dB) | images/s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
