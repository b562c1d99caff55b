"""Expert fit: our one-pass statistics + exact sweep against the floor and against scikit-learn.

    python benchmarks/expert_fit.py --n 100000 [--data data/bench100k] [--small 20000]

Measured in one run, each part in a fresh subprocess (so peak RSS is its own):

- ours at ``--small``, ``--n / 2`` and ``--n`` rows: the statistics pass (36 cells, float64), the solves
  (global + 9 physical + 4 SNR groups x the whole alpha sweep), the validation pass that
  picks alpha, and peak RSS;
- the floor: a bare float64 X^T X pass over the same rows, read the same way;
- scikit-learn: StandardScaler + Ridge (one alpha) for the same 14 groups on the same rows
  held in memory (loading excluded; the rows are float32 as stored, so scikit-learn computes
  in float32 where we accumulate in float64), and its peak RSS, extrapolated to 1M rows; run once as
  a user runs it and once with the glibc heap setting our fit runs with
  (:data:`moe.shared.heap.HEAP_ENV`, ``MALLOC_MMAP_THRESHOLD_``), so the comparison can be read
  without that advantage.

``--heap-compare`` measures only our fit at ``--n`` rows three times side by side, each in a fresh process:
with glibc's defaults, with the thresholds set by ``mallopt`` through ctypes at the start of the process (what
``moe/experts/heap.py`` did before eae6070) and with :data:`HEAP_ENV` in the environment (what the fit's child
gets now); wall time of each part, minor page faults (``getrusage``) and peak RSS.

Targets: pass <= 1.5x the bare pass; our whole fit <= scikit-learn's single-alpha fit;
our RSS flat in N. The shards are read once before any timing so that every part finds
them in the page cache (disk speed would otherwise land on whichever part reads first).
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from moe.data.synth import SynthConfig, write_dataset
from moe.experts.ridge import DEFAULT_ALPHAS
from moe.shared.heap import HEAP_ENV

OURS = r"""
import json, resource, sys, time
if sys.argv[4:] == ["mallopt"]:  # the former moe/experts/heap.py: M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2^31 - 1
    import ctypes, ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    assert libc.mallopt(-3, ctypes.c_int(1 << 30)) and libc.mallopt(-1, ctypes.c_int(2**31 - 1))
from moe.data.datamodule import SpectraDataModule
from moe.experts.fit import FitConfig, fit_families
dm = SpectraDataModule(sys.argv[1], max_train_rows=int(sys.argv[2]), num_workers=0, synth=None)
dm.noisy_caches("val")
fits, pca, t = fit_families(dm, FitConfig(products=sys.argv[3]), progress=False)
usage = resource.getrusage(resource.RUSAGE_SELF)
t["rss_mb"], t["minor_faults"] = usage.ru_maxrss / 1024, usage.ru_minflt
print(json.dumps(t))
"""

BARE = r"""
import json, resource, sys, time
import numpy as np
from moe.data.datamodule import SpectraDataModule
from moe.data.stream import SpectraStream
dm = SpectraDataModule(sys.argv[1], max_train_rows=int(sys.argv[2]), num_workers=0, synth=None)
acc = np.zeros((dm.n_pixels, dm.n_pixels))
t = time.perf_counter()
for b in SpectraStream(dm.train_set, 4096, 1.0, 4096):
    x = b["flux"].numpy().astype(np.float64)
    acc += x.T @ x
print(json.dumps({"bare_s": time.perf_counter() - t, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

SKLEARN = r"""
import json, resource, sys, time
import numpy as np
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler
from moe.data.datamodule import SpectraDataModule
from moe.data.stream import SpectraStream
from moe.experts import groups
dm = SpectraDataModule(sys.argv[1], max_train_rows=int(sys.argv[2]), num_workers=0, synth=None)
t = time.perf_counter()
parts = [{k: v.numpy() for k, v in b.items()} for b in SpectraStream(dm.train_set, 4096, 1.0, 4096)]
x = np.concatenate([p["flux"] for p in parts]); y = np.concatenate([p["log_g"] for p in parts]).astype(np.float64)
pb = np.concatenate([p["phys_bin"] for p in parts]); sb = np.concatenate([p["snr_bin"] for p in parts])
del parts
load_s = time.perf_counter() - t
rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
for fam in ("global", "phys", "snr"):
    g = groups.group_of(fam, pb, sb)
    for k in range(groups.FAMILY_SIZES[fam]):
        m = g == k
        z = StandardScaler().fit_transform(x[m])
        Ridge(alpha=1e5).fit(z, y[m])
        del z
print(json.dumps({"sklearn_s": time.perf_counter() - t, "load_s": load_s, "rss_loaded_mb": rss_loaded,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(code: str, *args, env: dict | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        check=True,
        capture_output=True,
        text=True,
        env=None if env is None else os.environ | env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


HEAP_SETTINGS = {  # name -> (extra argument of OURS, environment)
    "glibc defaults": ((), None),
    "mallopt (ctypes, before eae6070)": (("mallopt",), None),
    "HEAP_ENV (child's environment, now)": ((), HEAP_ENV),
}


def heap_compare(data: str, n: int) -> None:
    """Our fit at ``n`` rows under each heap setting, in that order, each in a fresh process."""
    if any(k.startswith("MALLOC_") for k in os.environ):
        raise SystemExit("unset the MALLOC_* variables first: the 'glibc defaults' run would inherit them")
    runs = {name: run(OURS, data, n, "float64", *extra, env=env) for name, (extra, env) in HEAP_SETTINGS.items()}
    print(f"expert fit at {n} rows x 4096 px, float64 products; one fresh process per heap setting")
    print(f"{'heap setting':<38}{'stats s':>9}{'solves s':>10}{'fit s':>8}{'minor faults':>14}{'peak RSS MB':>13}")
    for name, t in runs.items():
        total = t["stats_s"] + t["solve_s"] + t["validate_s"]
        print(
            f"{name:<38}{t['stats_s']:>9.1f}{t['solve_s']:>10.1f}{total:>8.1f}{t['minor_faults']:>14d}{t['rss_mb']:>13.0f}"
        )
    print(
        json.dumps(
            {
                "n": n,
                **{
                    name: {k: t[k] for k in ("stats_s", "solve_s", "validate_s", "minor_faults", "rss_mb")}
                    for name, t in runs.items()
                },
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--small", type=int, default=20_000)
    ap.add_argument("--data", default="data/bench100k")
    ap.add_argument("--rows", type=int, default=100_000, help="training rows of the dataset written at --data")
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--heap-compare", action="store_true", help="only our fit at --n rows under each heap setting")
    a = ap.parse_args()
    write_dataset(a.data, SynthConfig(max(a.n, a.rows), 2000, 2000, 20_000, 4096, 0))

    for shard in sorted(Path(a.data).glob("*/dataset.h5")):  # warm the page cache
        with open(shard, "rb") as f:
            while f.read(1 << 24):
                pass
    if a.heap_compare:
        heap_compare(a.data, a.n)
        return
    # ours runs with the environment the child process of load_or_fit gets (moe.experts.isolated)
    small = run(OURS, a.data, a.small, "float64", env=HEAP_ENV)
    mid = run(OURS, a.data, a.n // 2, "float64", env=HEAP_ENV)
    ours = run(OURS, a.data, a.n, "float64", env=HEAP_ENV)
    ours32 = run(OURS, a.data, a.n, "float32", env=HEAP_ENV)
    bare = run(BARE, a.data, a.n)
    sk = None if a.skip_sklearn else run(SKLEARN, a.data, a.n)
    sk_heap = None if a.skip_sklearn else run(SKLEARN, a.data, a.n, env=HEAP_ENV)

    ours_total = ours["stats_s"] + ours["solve_s"] + ours["validate_s"]
    fig = {
        "n": a.n,
        "stats_pass_s": ours["stats_s"],
        "solves_s": ours["solve_s"],
        "validate_s": ours["validate_s"],
        "pca_s": ours["pca_s"],
        "ours_total_s": ours_total,
        "minor_faults": ours["minor_faults"],
        "systems": ours["systems"],
        "factorizations": ours["factorizations"],
        "cg_steps": ours["cg_steps"],
        "stats_pass_f32_s": ours32["stats_s"],
        "bare_xtx_s": bare["bare_s"],
        "pass_over_bare": ours["stats_s"] / bare["bare_s"],
        "pass_f32_over_bare": ours32["stats_s"] / bare["bare_s"],
        "rss_mb_small": small["rss_mb"],
        "rss_mb_n": ours["rss_mb"],
        "rss_ratio": ours["rss_mb"] / small["rss_mb"],
        "rss_mb_half": mid["rss_mb"],
        "rss_ratio_half": ours["rss_mb"] / mid["rss_mb"],
        "small": a.small,
    }
    if sk is not None:
        per_row = (sk["rss_mb"] - bare["rss_mb"]) / a.n
        fig |= {
            "sklearn_s": sk["sklearn_s"],
            "sklearn_load_s": sk["load_s"],
            "ours_over_sklearn": ours_total / sk["sklearn_s"],
            "sklearn_rss_mb": sk["rss_mb"],
            "sklearn_rss_1m_gb_est": (bare["rss_mb"] + per_row * 1_000_000) / 1024,
            "sklearn_heap_s": sk_heap["sklearn_s"],
            "ours_over_sklearn_heap": ours_total / sk_heap["sklearn_s"],
        }
    fig = {k: round(v, 3) if isinstance(v, float) else v for k, v in fig.items()}

    print(f"rows: {a.n} x 4096 px; groups: 1 global + 9 physical + 4 SNR; alpha sweep of {len(DEFAULT_ALPHAS)}")
    print(f"{'statistics pass (ours, 36 cells, f64)':<46}{fig['stats_pass_s']:>9.1f} s")
    print(f"{'statistics pass (ours, f32 products)':<46}{fig['stats_pass_f32_s']:>9.1f} s")
    print(f"{'bare X^T X pass (floor, f64)':<46}{fig['bare_xtx_s']:>9.1f} s")
    print(
        f"{f'solves, 14 groups x {len(DEFAULT_ALPHAS)} alphas':<46}{fig['solves_s']:>9.1f} s   ({fig['systems']} systems: "
        f"{fig['factorizations']} float32 factorisations, {fig['cg_steps']} CG steps)"
    )
    print(f"{'validation pass (alpha choice)':<46}{fig['validate_s']:>9.1f} s")
    print(f"{'ours, whole fit':<46}{fig['ours_total_s']:>9.1f} s   ({fig['minor_faults']} minor page faults)")
    if sk is not None:
        print(
            f"{'scikit-learn, 14 groups at one alpha':<46}{fig['sklearn_s']:>9.1f} s   (+ {fig['sklearn_load_s']:.1f} s loading)"
        )
        print(f"{'scikit-learn, same, with our heap setting':<46}{fig['sklearn_heap_s']:>9.1f} s")
    print(f"{'peak RSS ours at ' + str(a.small):<46}{fig['rss_mb_small']:>9.0f} MB")
    print(f"{'peak RSS ours at ' + str(a.n // 2):<46}{fig['rss_mb_half']:>9.0f} MB")
    print(f"{'peak RSS ours at ' + str(a.n):<46}{fig['rss_mb_n']:>9.0f} MB")
    if sk is not None:
        print(
            f"{'peak RSS scikit-learn at ' + str(a.n):<46}{fig['sklearn_rss_mb']:>9.0f} MB  (~{fig['sklearn_rss_1m_gb_est']:.0f} GB at 1M rows)"
        )
    print(
        f"ratios: pass / bare = {fig['pass_over_bare']:.2f} (target <= 1.5); f32 pass / bare = {fig['pass_f32_over_bare']:.2f}; "
        + (
            f"ours / sklearn = {fig['ours_over_sklearn']:.2f} (target <= 1; {fig['ours_over_sklearn_heap']:.2f} "
            "against sklearn with our heap setting); "
            if sk is not None
            else ""
        )
        + f"RSS {a.n} / {a.small} = {fig['rss_ratio']:.2f}, {a.n} / {a.n // 2} = {fig['rss_ratio_half']:.2f} (target ~1)"
    )
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
