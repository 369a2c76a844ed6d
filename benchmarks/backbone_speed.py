"""Training speed of candidate backbone sizes on this CPU (batch 64, bf16 autocast, 2 threads).

Median of 5 timed AdamW steps after one warm-up step; printed, one line per config
(image size, patch, width, layers). Used to size the bundled model (benchmarks/results/backbone.md).

    python benchmarks/backbone_speed.py
"""

import time

import torch
from diffusers import DiTTransformer2DModel

torch.set_num_threads(2)
for S, P, W, H, L in [(16, 2, 128, 4, 12), (16, 2, 192, 6, 12), (28, 4, 192, 6, 12)]:
    m = DiTTransformer2DModel(
        num_attention_heads=H,
        attention_head_dim=W // H,
        in_channels=1,
        out_channels=1,
        num_layers=L,
        sample_size=S,
        patch_size=P,
        num_embeds_ada_norm=10,
    )
    for blk in m.transformer_blocks:
        blk.norm1.emb.class_embedder.dropout_prob = 0.0
    n = sum(p.numel() for p in m.parameters())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.randn(64, 1, S, S)
    t = torch.randint(0, 1000, (64,))
    y = torch.randint(0, 11, (64,))
    ts = []
    for i in range(6):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, timestep=t, class_labels=y).sample
        loss = (out.float() - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ts.append(time.perf_counter() - t0)
    print(S, P, W, L, f"{n / 1e6:.2f}M", f"{sorted(ts[1:])[2] * 1000:.0f} ms/step bf16")
