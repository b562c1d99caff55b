"""The heap setting of an experiment's process: the ceiling's 1D-CNN under glibc's defaults and under ``HEAP_ENV``.

    python benchmarks/experiment_heap.py [--rows 2636] [--epochs 2] [--repeat 1]

``moe experiments`` runs each experiment in a spawned process (:func:`moe.experiments.__main__.run_in_child`) whose
environment carries the expert fit's heap setting (:data:`moe.shared.heap.HEAP_ENV`). This fits the ceiling's
:class:`moe.experts.nonlinear.CNNExpert` (its defaults, ``--epochs`` epochs) on ``--rows`` random spectra of 4096
pixels (a metal-poor bin of the default series holds ~2600) in one fresh process per setting started by
``run_in_child``, in one run, and prints the fit's wall time, the process's minor page faults and peak RSS, and the
ratio of the times. The cost does not depend on the spectra's values.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from moe.experiments.__main__ import run_in_child
from moe.shared.heap import HEAP_ENV


def fit_cnn(rows: int, epochs: int) -> tuple[float, int, float]:
    """In a fresh process: the CNN's fit in s, the process's minor page faults during it, its peak RSS in GB."""
    from moe.experts.nonlinear import CNNExpert

    rng = np.random.default_rng(0)
    clean = rng.normal(size=(rows, 4096)).astype(np.float32)
    error = np.full_like(clean, 0.1)
    y = rng.normal(size=rows)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    CNNExpert(epochs=epochs).fit(clean, error, y, clean[: rows // 4], y[: rows // 4])
    seconds = time.perf_counter() - t
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return seconds, usage.ru_minflt - faults, usage.ru_maxrss / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2636)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="fits per setting, alternating; the shortest is kept")
    a = p.parse_args()
    settings = {"glibc defaults": {}, "HEAP_ENV (moe experiments)": HEAP_ENV}
    best: dict[str, tuple[float, int, float]] = {}
    for _ in range(a.repeat):
        for name, env in settings.items():
            result = run_in_child(fit_cnn, a.rows, a.epochs, env=env)
            best[name] = min(best.get(name, result), result)
    print(f"1D-CNN fit, {a.rows} spectra x 4096 px, {a.epochs} epochs; one fresh spawned process per setting")
    print(f"{'heap setting':<28}{'fit s':>8}{'minor faults':>14}{'peak RSS GB':>13}")
    for name, (seconds, faults, peak) in best.items():
        print(f"{name:<28}{seconds:>8.1f}{faults:>14,}{peak:>13.2f}")
    default, heap = (best[name][0] for name in settings)
    print(f"HEAP_ENV / defaults: {heap / default:.2f}x the time")


if __name__ == "__main__":
    main()
