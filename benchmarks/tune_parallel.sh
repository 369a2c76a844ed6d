#!/usr/bin/env bash
# ilf tune's layout: one candidate per rank vs data-parallel per candidate, training throughput (run alone;
# results in benchmarks/results/tune_t2i.md). OUT: where the runs go (default runs/tune-parallel).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
F="--model fashion-dit --loop-start 5 --loop-end 6 --loop-steps last:8 --feedback-init copy:6 --steps 10 --teacher-steps 20 --states teacher --bank-size 256 --batch-size 32 --train-steps 45 --ckpt-every 1000 --val-samples 2 --no-progress --bank-cache ${OUT:-runs/tune-parallel}/banks --overwrite"
# warm the bank caches (rank 0 and rank 1 banks)
.venv/bin/torchrun --standalone --nproc-per-node 2 -m ilf_runtime train $F --train-steps 2 --out ${OUT:-runs/tune-parallel}/warm >/dev/null 2>&1
for rep in 1 2; do
  .venv/bin/torchrun --standalone --nproc-per-node 2 -m ilf_runtime train $F --out ${OUT:-runs/tune-parallel}/ddp$rep >/dev/null 2>&1
  .venv/bin/python -m ilf_runtime train $F --out ${OUT:-runs/tune-parallel}/a$rep >/dev/null 2>&1 &
  .venv/bin/python -m ilf_runtime train $F --out ${OUT:-runs/tune-parallel}/b$rep >/dev/null 2>&1 &
  wait
done
OUT="${OUT:-runs/tune-parallel}" .venv/bin/python - <<'PY'
import csv
import os
def rate(d, procs_batch):
    r = list(csv.DictReader(open(f"{os.environ['OUT']}/{d}/log.csv")))
    t = float(r[44]["seconds"]) - float(r[4]["seconds"])
    return 40 * procs_batch / t, t / 40
for rep in (1, 2):
    ddp = rate(f"ddp{rep}", 64)
    a, b = rate(f"a{rep}", 32), rate(f"b{rep}", 32)
    print(f"pass {rep}: DDP 2 ranks: {ddp[0]:.1f} samples/s ({ddp[1]:.3f} s/step of 64); "
          f"two independent runs: {a[0] + b[0]:.1f} samples/s ({a[1]:.3f}, {b[1]:.3f} s/step of 32 each)")
PY
