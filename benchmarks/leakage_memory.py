"""Peak RSS of each step of the leakage audit (``moe experiments leakage``) at a given training size.

Usage: ``python benchmarks/leakage_memory.py [--n-train 20000] [--data data/synth]``. The process's peak
RSS (VmHWM) is reset between steps (``/proc/self/clear_refs``, Linux) so each line is that step's own
peak; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from moe.experiments import leakage
from moe.experiments.common import ExperimentSettings, load_splits


def _rss_gb() -> tuple[float, float]:
    """(current, peak since the last reset) RSS in GB."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmRSS"].split()[0]) / 1e6, int(status["VmHWM"].split()[0]) / 1e6


def _step(name: str, fn, record: dict):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, _ = _rss_gb()
    started = time.time()
    out = fn()
    after, peak = _rss_gb()
    print(
        f"{name:44s} peak {peak:5.2f} GB (+{peak - before:4.2f})  after {after:5.2f} GB  {time.time() - started:6.1f} s"
    )
    record[name] = {
        "peak_gb": round(peak, 3),
        "added_gb": round(peak - before, 3),
        "s": round(time.time() - started, 1),
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-train", type=int, default=20_000)
    p.add_argument("--data", default="data/synth")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = ExperimentSettings(data=a.data, n_train=a.n_train, progress=False)
    dm = settings.datamodule()
    record: dict = {"n_train": a.n_train, "start_gb": round(_rss_gb()[0], 3)}
    splits = _step(
        "error vectors of the three splits",
        lambda: dict(zip(leakage.SPLITS, load_splits(dm, settings, keep_flux=False))),
        record,
    )
    models = _step(
        "OLS, Ridge sweep (one Gram), LightGBM", lambda: leakage._error_only_models(splits, settings), record
    )
    alpha = leakage.RIDGE_ALPHAS[models[2]]
    sanity = _step(
        "sanity checks (statistics, shuffle, mask)",
        lambda: leakage._sanity_checks(splits, models[5], dm.noise_level, alpha, settings.seeds),
        record,
    )
    print(models[0][["model", "r2_train", "r2_val", "r2_test"]].to_string(index=False))
    print(sanity[["check", "r2_test", "r2_ci_low", "r2_ci_high"]].to_string(index=False))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
