"""Spectra per second of the synthetic generator, shards written to disk.

python benchmarks/synth_speed.py [--n 20000] [--pixels 4096]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from moe.data.synth import SynthConfig, write_dataset

TARGET = 2000.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--pixels", type=int, default=4096)
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="synth-bench-"))
    try:
        t = time.perf_counter()
        write_dataset(out / "d", SynthConfig(a.n, 1000, 1000, 10_000, a.pixels, 0), progress=False)
        dt = time.perf_counter() - t
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rate = (a.n + 2000) / dt
    print(
        f"{'spectra':<20}{a.n + 2000}\n{'seconds':<20}{dt:.2f}\n{'spectra/s':<20}{rate:.0f}\n"
        f"{'ratio to target':<20}{rate / TARGET:.2f}  (target {TARGET:.0f}/s)"
    )
    print(
        json.dumps(
            {
                "spectra": a.n + 2000,
                "seconds": round(dt, 3),
                "spectra_per_s": round(rate, 1),
                "ratio_to_target": round(rate / TARGET, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
