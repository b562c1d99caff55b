"""How the errors of a gate's labels go together on the test split: the correlation of each pair of labels'
residuals (pred - true) and of their z = residual / sigma, overall and per SNR bin.

    python benchmarks/label_residuals.py --ckpt lightning_logs/concat-phys/version_N/checkpoints/last.ckpt \\
        [--data data/synth]

The catalogue gives each label its own calibrated sigma and no correlation column; this measures what a user
combining two labels of one star would need (Pearson's r, with its 95% interval from Fisher's z). The last line
is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import warnings

import numpy as np
import torch

from moe.data import bins
from moe.data.datamodule import SpectraDataModule
from moe.gates import GatedMoE
from moe.prepare import attach_inputs, stream_labels


def pearson(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """r and its 95% interval (Fisher's z)."""
    r = float(np.corrcoef(a, b)[0, 1])
    half = 1.96 / np.sqrt(max(len(a) - 3, 1))
    z = np.arctanh(np.clip(r, -0.999999, 0.999999))
    return r, float(np.tanh(z - half)), float(np.tanh(z + half))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", default="data/synth")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    model = GatedMoE.load_from_checkpoint(a.ckpt, weights_only=False).eval()
    dm = SpectraDataModule(a.data, synth=None, noise_level=model.hparams.noise_level)
    stream_labels(dm, model.labels)
    attach_inputs(dm, *model.mixture.projection(), model.mixture.physics.pixels, ("test",), progress=False)
    parts = {"resid": [], "z": [], "snr_bin": []}
    for batch in dm.stream("test", cached=True):
        out = model(batch)
        resid = out.pred - model.mixture.targets(batch)
        parts["resid"].append(resid)
        parts["z"].append(resid / out.sigma)
        parts["snr_bin"].append(batch["snr_bin"])
    cat = {k: torch.cat(v).double().numpy() for k, v in parts.items()}
    labels = model.labels
    rows = []
    print(f"test split of {a.data}: correlation of the labels' errors (r [95% interval])")
    print(f"{'pair':<16}{'slice':<8}{'n':>6}{'residuals':>26}{'z':>26}")
    for (i, p), (j, q) in itertools.combinations(enumerate(labels), 2):
        for name, sel in bins.snr_slices(cat["snr_bin"].astype(np.int64), high_first=True):
            rr = pearson(cat["resid"][sel, i], cat["resid"][sel, j])
            rz = pearson(cat["z"][sel, i], cat["z"][sel, j])
            rows.append({"pair": f"{p}-{q}", "slice": name, "n": int(sel.sum()), "r_resid": rr, "r_z": rz})
            fmt = "{:+.3f} [{:+.3f}, {:+.3f}]"
            print(f"{p + '-' + q:<16}{name:<8}{int(sel.sum()):>6}{fmt.format(*rr):>26}{fmt.format(*rz):>26}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
