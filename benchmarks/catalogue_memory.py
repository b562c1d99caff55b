"""Peak RSS of the catalogue writers against the number of rows: flat in rows for CSV, HDF5 and FITS.

    flock /tmp/moe-bench.lock python benchmarks/catalogue_memory.py [--rows 100000 1000000] [--out DIR]

Each (format, rows) runs in a fresh process that feeds the writer of :mod:`moe.catalogue.writers` batches of
4096 rows shaped like a catalogue of 9 experts (shard path, ids, SNR, log g, sigma, truth, 18 gate and expert
columns, n_masked, ood_score, flags) and reports its peak RSS and wall time; the file is then read back
(row count; for FITS ``astropy.table.Table.read`` with memory mapping) and removed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np, pandas as pd
from moe.catalogue.writers import writer_for
path, rows = Path(sys.argv[1]), int(sys.argv[2])
shard = "/data/pfs/observations/night_0001/dataset.h5"
w = writer_for(path, {"moe_version": "bench", "checkpoint": "bench.ckpt", "noise_level": 1.0},
               {"shard": len(shard), "snr_bin": 1})
rng = np.random.default_rng(0)
names = [f"{t}-{m}" for t in ("Cool", "Mid", "Hot") for m in ("Poor", "Solar", "Rich")]
t0 = time.perf_counter()
for start in range(0, rows, 4096):
    n = min(4096, rows - start)
    cols = {"shard": np.full(n, shard, dtype=object), "row": np.arange(start, start + n), "objid": np.arange(n),
            "mag": rng.uniform(20.5, 22.5, n), "snr": rng.uniform(0, 10, n).astype(np.float32),
            "snr_bin": np.full(n, "M", dtype=object), "log_g_pred": rng.uniform(1, 5, n).astype(np.float32),
            "log_g_sigma": rng.uniform(0.1, 1, n).astype(np.float32)}
    cols |= {f"w_{k}": rng.random(n).astype(np.float32) for k in names}
    cols |= {f"pred_{k}": rng.uniform(1, 5, n).astype(np.float32) for k in names}
    cols |= {"log_g_true": rng.uniform(1, 5, n).astype(np.float32), "n_masked": rng.integers(0, 300, n).astype(np.int32),
             "ood_score": rng.random(n).astype(np.float32), "flags": rng.integers(0, 32, n).astype(np.int32)}
    w.append(pd.DataFrame(cols))
w.commit()
wall = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"rss_mb": rss, "wall_s": wall, "mb": path.stat().st_size / 2**20}))
"""

READ = r"""
import sys, warnings
from pathlib import Path
path = Path(sys.argv[1])
if path.suffix == ".fits":
    from astropy.table import Table
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        print(len(Table.read(path, memmap=True)))
elif path.suffix == ".h5":
    import pandas as pd
    with pd.HDFStore(path, "r") as s:
        print(s.get_storer("catalogue").nrows)
else:
    print(sum(1 for _ in open(path)) - 1)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--out", default=None, help="folder for the catalogues (default: a temporary one)")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="moe-catalogue-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'format':<7}{'rows':>10}{'peak RSS':>12}{'wall':>10}{'file':>10}")
    results = []
    for suffix in (".csv", ".h5", ".fits"):
        for rows in a.rows:
            path = out / f"catalogue{rows}{suffix}"
            res = json.loads(
                subprocess.run(
                    [sys.executable, "-c", CHILD, str(path), str(rows)], capture_output=True, text=True, check=True
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            back = int(
                subprocess.run(
                    [sys.executable, "-c", READ, str(path)], capture_output=True, text=True, check=True
                ).stdout.strip()
            )
            if back != rows:
                raise SystemExit(f"{path}: read back {back} rows, wrote {rows}")
            path.unlink()
            print(
                f"{suffix[1:]:<7}{rows:>10}{res['rss_mb']:>9.0f} MB{res['wall_s']:>8.1f} s{res['mb']:>7.0f} MB",
                flush=True,
            )
            results.append({"format": suffix[1:], "rows": rows, **res})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
