"""The statistics pass for one label vs three, side by side in one run.

    python benchmarks/label_stats.py [--data data/synth] [--rows 20000] [--repeats 3]

Times :func:`moe.experts.fit.accumulate_stats` (the experts' one streamed pass: 36 cells, float64
Grams, the default families) over the same training rows with ``labels=("log_g",)`` and with
``("log_g", "T_eff", "M_H")``, alternating the two (1, 3, 3, 1, 1, 3, ...) so drift in the machine's
load falls on both alike, after one untimed pass that brings the shards into the page cache.
Reports each configuration's fastest and median pass and their ratios (target: three labels
<= 1.05x one). For context, once per configuration (after its first timed pass), the solves of the
14 groups x the alpha sweep from those statistics (every label from the same factorisations; its CG
steps are per label). The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from moe.data.folder import SpectraFolder
from moe.experts.fit import FitConfig, _paths, accumulate_stats, noise_variance

ONE, THREE = ("log_g",), ("log_g", "T_eff", "M_H")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/synth", help="dataset folder (the embedded default)")
    p.add_argument("--rows", type=int, default=20_000, help="training rows of the pass")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per configuration")
    a = p.parse_args()
    folder = SpectraFolder(a.data, max_train_rows=a.rows, synth=None)
    accumulate_stats(folder, FitConfig(labels=THREE), progress=False)  # warm-up: shards into the page cache
    times: dict[tuple[str, ...], list[float]] = {ONE: [], THREE: []}
    solve: dict[tuple[str, ...], dict] = {}
    for i in range(a.repeats):
        for labels in (ONE, THREE) if i % 2 == 0 else (THREE, ONE):
            cfg = FitConfig(labels=labels)
            t = time.perf_counter()
            stats, partition = accumulate_stats(folder, cfg, progress=False)
            times[labels].append(time.perf_counter() - t)
            assert stats.sy.shape[1] == len(labels)
            if labels not in solve:
                info: dict = {}
                t = time.perf_counter()
                _paths(stats, partition, list(cfg.families), cfg, noise_variance(folder, cfg), solver=info)
                solve[labels] = {"solve_s": time.perf_counter() - t, **info}
            cells = int(stats.n.size)
            del stats
    fig = {
        "rows": folder.train_set.n_kept,
        "n_pixels": folder.n_pixels,
        "cells": cells,
        "one_label_s": times[ONE],
        "three_labels_s": times[THREE],
        "ratio_min": min(times[THREE]) / min(times[ONE]),
        "ratio_median": float(np.median(times[THREE]) / np.median(times[ONE])),
        "solve_one": solve[ONE],
        "solve_three": solve[THREE],
    }
    print(f"statistics pass, {fig['rows']} rows x {fig['n_pixels']} pixels, {fig['cells']} cells, {a.repeats} each:")
    print(f"{'labels':<20}{'fastest s':>11}{'median s':>11}{'spectra/s':>11}")
    for labels in (ONE, THREE):
        t = times[labels]
        print(f"{', '.join(labels):<20}{min(t):>11.2f}{np.median(t):>11.2f}{fig['rows'] / min(t):>11.0f}")
    print(f"three / one: fastest {fig['ratio_min']:.3f}x, median {fig['ratio_median']:.3f}x (target <= 1.05x)")
    for labels in (ONE, THREE):
        s = solve[labels]
        print(
            f"solves, {', '.join(labels)}: {s['solve_s']:.1f} s ({s['systems']} systems, "
            f"{s['factorizations']} float32 factorisations, {s['cg_steps']} CG steps)"
        )
    print(f"solves three / one: {solve[THREE]['solve_s'] / solve[ONE]['solve_s']:.2f}x")
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
