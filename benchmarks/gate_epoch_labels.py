"""One gate-training epoch of a 3-label gate against the log-g-only gate, side by side in one run.

    python benchmarks/gate_epoch_labels.py [--data data/synth] [--repeats 3] [--routing per_label|shared]

Both gates (concat over the 9 physical experts, the DataModule's default loader settings) are prepared
first (experts and gate-input caches: fitted or found in the cache, not timed), their caches read once
(page cache), then one ``pl.Trainer`` training epoch of each is timed, alternating 1-label / 3-label
``--repeats`` times (no validation, so no sigma refit: the epoch alone). What grows with the labels: the
cached projections per row (P = K L + L + 4: 14 -> 34), their noise factor (P x P) and the mixture.

Target: 3-label epoch / 1-label epoch <= 1.25 (median of the repeats). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gate_epoch import our_epoch, warm  # noqa: E402

from moe.data.datamodule import SpectraDataModule  # noqa: E402
from moe.gates import GatedMoE  # noqa: E402
from moe.prepare import prepare  # noqa: E402

LABEL_SETS = {"1 label (log g)": ["log_g"], "3 labels": ["log_g", "T_eff", "M_H"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/synth", help="dataset folder (the embedded one by default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--routing", default="per_label", choices=["shared", "per_label"])
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    device = torch.device("cpu")

    runs = {}
    for name, labels in LABEL_SETS.items():
        dm = SpectraDataModule(a.data, synth=None)
        model = GatedMoE("concat", n_pixels=dm.n_pixels, noise_level=dm.noise_level, labels=labels, routing=a.routing)
        model.load_prepared(prepare(dm, model.prepare_config(), progress=False))
        warm(p for paths in dm.inputs.values() for p in paths.values())
        runs[name] = (dm, model)
    seconds = {name: [] for name in runs}
    for _ in range(a.repeats):
        for name, (dm, model) in runs.items():
            pl.seed_everything(0, verbose=False)
            seconds[name].append(our_epoch(dm, model, device))
    one, three = (statistics.median(seconds[n]) for n in LABEL_SETS)
    n = runs["3 labels"][0].train_set.n_kept
    fig = {
        "rows": n,
        "routing": a.routing,
        "repeats": a.repeats,
        "one_label_s": one,
        "three_labels_s": three,
        "ratio": three / one,
        "one_label_all_s": seconds["1 label (log g)"],
        "three_labels_all_s": seconds["3 labels"],
        "projections": {name: int(m.mixture.projection()[0].shape[0]) for name, (_, m) in runs.items()},
    }
    print(f"gate epoch (concat, 9 experts, {a.routing} routing), {n} training rows, median of {a.repeats}")
    print(f"{'labels':<20}{'projections':>12}{'seconds':>9}{'spectra/s':>11}")
    for name in runs:
        s = statistics.median(seconds[name])
        print(f"{name:<20}{fig['projections'][name]:>12}{s:>9.2f}{n / s:>11.0f}")
    print(f"ratio 3 labels / 1 label = {three / one:.2f} (target <= 1.25)")
    print(json.dumps({k: [round(x, 3) for x in v] if isinstance(v, list) else v for k, v in fig.items()}))


if __name__ == "__main__":
    main()
