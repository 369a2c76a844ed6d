"""Trains the Fashion-MNIST classifier that ilf_runtime.metrics uses for FID features and class
accuracy, and writes it into the package (ilf_runtime/assets/fashion-classifier/).

    python scripts/train_classifier.py            # about 3 minutes on 2 CPU cores

Train split only; the test split measures the accuracy recorded in config.json. Images are
area-downsampled to 16x16 like the bundled DiT's, with random 1-pixel shifts as augmentation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ilf_runtime.fashion.classifier import CLASSIFIER_DIR, FashionClassifier
from ilf_runtime.fashion.data import load_fashion_mnist, to_model_range


def shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift by up to one pixel (edge-padded), per batch."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return x[:, :, 1 + dy : 1 + dy + x.shape[2] - 2, 1 + dx : 1 + dx + x.shape[3] - 2]


@torch.no_grad()
def accuracy(model: FashionClassifier, x01: torch.Tensor, y: torch.Tensor) -> float:
    preds = torch.cat([model(x01[i : i + 2000]).argmax(1) for i in range(0, len(x01), 2000)])
    return float((preds == y).float().mean())


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    ap = argparse.ArgumentParser(description="Train the Fashion-MNIST feature classifier.")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(CLASSIFIER_DIR))
    a = ap.parse_args(argv)

    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    xtr = (to_model_range(train.images, a.size) + 1) / 2  # (60000, 1, S, S) in [0, 1]
    xte = (to_model_range(test.images, a.size) + 1) / 2
    arch = {"size": a.size, "width": 32, "feat_dim": 256, "num_classes": 10}
    model = FashionClassifier(**arch)
    steps = a.epochs * (len(xtr) // a.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=steps)
    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc="classifier", unit="step")
    for _ in range(a.epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(len(xtr) // a.batch_size):
            idx = perm[i * a.batch_size : (i + 1) * a.batch_size]
            loss = F.cross_entropy(model(shift(xtr[idx], gen)), train.labels[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    bar.close()
    model.eval()
    acc = accuracy(model, xte, test.labels)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    info = {
        "arch": arch,
        "test_accuracy": round(acc, 4),
        "train_accuracy": round(accuracy(model, xtr, train.labels), 4),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "args": vars(a) | {"out": "ilf_runtime/assets/fashion-classifier"},
        "data": "Fashion-MNIST train split (60,000), area-downsampled to size x size; test split for accuracy",
    }
    (out / "config.json").write_text(json.dumps(info, indent=1))
    print(f"test accuracy {acc:.4f}; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
