"""The dual tower's preparation with every family fitted for every label, and as the experiment fits now.

    python benchmarks/dual_tower_fit.py [--data data/synth] [--rows 20000] [--order every,used] 2> fit.log

``every``: all four families (global, phys, snr, cells) for log g, T_eff and [M/H] -- the dual tower's fit
before ``FitConfig.family_labels``; ``used``: :func:`moe.experiments.dual_tower.expert_fit`, the global and
physical experts for the three labels (the every-label gate's) and the SNR and cell experts for log g only.
Each is prepared as :func:`moe.experiments.dual_tower.compute` prepares it (``prepare_families`` over the four
families for its log g gates: the expert fit, then each family's gate-input caches), cold: a fresh temporary
folder holds the expert bundle and the pre-noised and gate-input caches, so the data folder's own caches are
neither used nor written. Run it after reading the shards once (``cat data/synth/*/dataset.h5 > /dev/null``).
Reports per configuration the preparation's wall time and the bundle's own timings (statistics pass, solves,
validation; systems, factorisations, CG steps), and checks that every (family, label) both fits hold is the
same expert (1e-12 relative). The fit's warnings go to stderr, each configuration's after a line ``== <name>``. The
last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np

from moe.experiments.common import ExperimentSettings
from moe.experiments.dual_tower import EVERY_LABEL, FAMILIES, expert_fit
from moe.experiments.gates import LABELS
from moe.prepare import PrepareConfig, prepare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/synth", help="dataset folder (the embedded default)")
    p.add_argument("--rows", type=int, default=20_000, help="training rows (20000: the 'all' size)")
    p.add_argument("--order", default="every,used", help="the configurations, in the order they run")
    a = p.parse_args()
    settings = ExperimentSettings(data=a.data, n_train=a.rows, progress=False)
    fits = {"every": settings.fit_config(FAMILIES, labels=EVERY_LABEL), "used": expert_fit(settings)}
    out, bundles = {}, {}
    for name in a.order.split(","):
        print(f"== {name}", file=sys.stderr, flush=True)  # the fit's warnings that follow are this one's
        with tempfile.TemporaryDirectory(prefix=f"dual_tower_fit_{name}_") as tmp:
            dm = settings.datamodule(cache_dir=tmp)
            rows = min(PrepareConfig.feature_rows, dm.train_set.n_kept)
            t = time.perf_counter()
            prepared = {
                f: prepare(dm, PrepareConfig(f, fits[name], experts_dir=tmp, feature_rows=rows, labels=LABELS), False)
                for f in FAMILIES
            }
            wall = time.perf_counter() - t
            bundle = prepared["phys"].bundle
            bundles[name] = bundle
            out[name] = {
                "prepare_s": wall,
                "families": {f: list(bundle.family_labels(f)) for f in bundle.family_names},
                **{k: round(v, 2) if isinstance(v, float) else v for k, v in bundle.timings.items()},
            }
        print(name, json.dumps(out[name]), flush=True)
    if set(bundles) == {"every", "used"}:
        worst = 0.0
        for label, fams in bundles["used"].fits.items():
            for fam, f in fams.items():
                ref = bundles["every"].family(fam, label)
                assert np.array_equal(f.alpha, ref.alpha), (label, fam)
                rel = np.max(np.abs(f.weight - ref.weight)) / np.max(np.abs(ref.weight))
                worst = max(worst, float(rel))
        out["max_rel_weight_diff"] = worst
        out["saved_s"] = out["every"]["prepare_s"] - out["used"]["prepare_s"]
    out["rows"] = settings.n_train
    print(json.dumps(out))


if __name__ == "__main__":
    main()
