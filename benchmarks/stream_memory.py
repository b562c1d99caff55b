"""Peak RSS of streaming a training split through SpectraDataModule, at 10k vs 100k rows.

Each size runs in a fresh subprocess (one pass over the rows, noise added as in training)
and reports its own peak RSS, so the numbers are comparable.

    python benchmarks/stream_memory.py [--data data/bench100k] [--sizes 10000 100000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from moe.data.synth import SynthConfig, write_dataset

CHILD = r"""
import resource, sys, time, torch
from moe.data.datamodule import SpectraDataModule
from moe.data.noise import add_noise
dm = SpectraDataModule(sys.argv[1], max_train_rows=int(sys.argv[2]), num_workers=int(sys.argv[3]),
                       batch_size=256, synth=None)
t = time.perf_counter(); n = 0; s = 0.0
for b in dm.train_dataloader():
    x = add_noise(b["flux"], b["error"], 1.0); n += x.shape[0]; s += float(x[:, 0].sum())
dt = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(n, dt, rss, kids)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data/bench100k")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    a = ap.parse_args()
    write_dataset(a.data, SynthConfig(max(a.sizes), 2000, 2000, 20_000, 4096, 0))
    rows, out = [], {}
    for w in a.workers:
        for n in a.sizes:
            res = subprocess.run(
                [sys.executable, "-c", CHILD, a.data, str(n), str(w)], check=True, capture_output=True, text=True
            ).stdout.split()
            seen, dt, rss, kids = int(res[0]), float(res[1]), float(res[2]), float(res[3])
            rows.append((w, n, seen, dt, rss, kids))
            out[f"rss_mb_w{w}_{n}"] = round(rss, 1)
            out[f"worker_rss_mb_w{w}_{n}"] = round(kids, 1)
            out[f"spectra_per_s_w{w}_{n}"] = round(seen / dt, 1)
    print(f"{'workers':>7} {'rows':>8} {'seen':>8} {'s':>7} {'spec/s':>8} {'main RSS MB':>12} {'worker RSS MB':>14}")
    for w, n, seen, dt, rss, kids in rows:
        print(f"{w:>7} {n:>8} {seen:>8} {dt:>7.1f} {seen / dt:>8.0f} {rss:>12.0f} {kids:>14.0f}")
    for w in a.workers:
        lo, hi = out[f"rss_mb_w{w}_{min(a.sizes)}"], out[f"rss_mb_w{w}_{max(a.sizes)}"]
        out[f"rss_ratio_w{w}"] = round(hi / lo, 3)
        print(f"workers={w}: peak RSS ratio {max(a.sizes)} / {min(a.sizes)} rows = {hi / lo:.3f} (target ~1)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
