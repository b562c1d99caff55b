"""One gate-training epoch of a 3-label gate against the log-g-only gate, side by side in one run.

    python benchmarks/gate_epoch_labels.py [--data data/synth] [--repeats 5] [--routing per_label shared]

The gates (concat over the 9 physical experts, the DataModule's default loader settings): log g alone, and the
three labels under each ``--routing`` (per_label: a gate network per label, run as one grouped network;
shared: one set of weights for every label). Each is prepared first (experts and gate-input caches: fitted or
found in the cache, not timed), their caches read once (page cache), then one ``pl.Trainer`` training epoch
of each is timed, in turn, ``--repeats`` times (no validation, so no sigma refit: the epoch alone). What grows
with the labels: the cached projections per row (P = K L + L + 4: 14 -> 34), their noise factor (P x P), the
mixture and, per label, the gate networks.

Target: 3-label epoch / 1-label epoch <= 1.25 (medians of the repeats). The last line is one JSON object.
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

ONE = "1 label (log g)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/synth", help="dataset folder (the embedded one by default)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--routing", nargs="+", default=["per_label", "shared"], choices=["per_label", "shared"])
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    device = torch.device("cpu")

    gates = {ONE: (["log_g"], "per_label")} | {
        f"3 labels, {routing}": (["log_g", "T_eff", "M_H"], routing) for routing in a.routing
    }
    runs = {}
    for name, (labels, routing) in gates.items():
        dm = SpectraDataModule(a.data, synth=None)
        model = GatedMoE("concat", n_pixels=dm.n_pixels, noise_level=dm.noise_level, labels=labels, routing=routing)
        model.load_prepared(prepare(dm, model.prepare_config(), progress=False))
        warm(p for paths in dm.inputs.values() for p in paths.values())
        runs[name] = (dm, model)
    seconds = {name: [] for name in runs}
    for _ in range(a.repeats):
        for name, (dm, model) in runs.items():
            pl.seed_everything(0, verbose=False)
            seconds[name].append(our_epoch(dm, model, device))
    median = {name: statistics.median(s) for name, s in seconds.items()}
    n = runs[ONE][0].train_set.n_kept
    fig = {
        "rows": n,
        "repeats": a.repeats,
        "seconds": median,
        "ratio": {name: median[name] / median[ONE] for name in runs if name != ONE},
        "all_s": {name: [round(x, 3) for x in s] for name, s in seconds.items()},
        "projections": {name: int(m.mixture.projection()[0].shape[0]) for name, (_, m) in runs.items()},
        "gate_tensors": {name: sum(1 for p in m.parameters() if p.requires_grad) for name, (_, m) in runs.items()},
    }
    print(f"gate epoch (concat, 9 experts), {n} training rows, median of {a.repeats}")
    print(f"{'gate':<28}{'projections':>12}{'seconds':>9}{'spectra/s':>11}{'ratio':>7}")
    for name in runs:
        ratio = f"{fig['ratio'][name]:>7.2f}" if name != ONE else f"{'':>7}"
        print(f"{name:<28}{fig['projections'][name]:>12}{median[name]:>9.2f}{n / median[name]:>11.0f}{ratio}")
    print("target: 3 labels / 1 label <= 1.25")
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
