"""How the errors of a gate's labels go together on the test split: the correlation of each pair of labels'
residuals (pred - true) and of their z = residual / sigma, overall and per SNR bin, against the calibrated
rho_<a>_<b> of the catalogue.

    python benchmarks/label_residuals.py --ckpt lightning_logs/concat-phys/version_N/checkpoints/last.ckpt \\
        [--data data/synth]

Per pair and slice: Pearson's r of the residuals (95% interval from Fisher's z) and of the z's; the mean of
the stars' calibrated rho and the 95% sampling interval of r in a sample of this size around it (is the z's r
inside?); the 2-D coverage, the share of stars whose (z_a, z_b) lies within the chi2(2) 68.3% / 95.4% ellipse
of their calibrated rho (and of rho 0). The last line is one JSON object.
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
from moe.gates.error_correlation import mahalanobis_coverage
from moe.prepare import attach_inputs, stream_labels


def fisher_interval(r: float, n: int) -> tuple[float, float]:
    """The 95% interval of Pearson's r of n pairs about r (Fisher's z)."""
    half = 1.96 / np.sqrt(max(n - 3, 1))
    z = np.arctanh(np.clip(r, -0.999999, 0.999999))
    return float(np.tanh(z - half)), float(np.tanh(z + half))


def pearson(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """r and its 95% interval (Fisher's z)."""
    r = float(np.corrcoef(a, b)[0, 1])
    return (r, *fisher_interval(r, len(a)))


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
    parts = {"resid": [], "z": [], "snr_bin": [], "rho": []}
    for batch in dm.stream("test", cached=True):
        out = model(batch)
        resid = out.pred - model.mixture.targets(batch)
        parts["resid"].append(resid)
        parts["z"].append(resid / out.sigma)
        parts["snr_bin"].append(batch["snr_bin"])
        parts["rho"].append(model.mixture.correlation(out.pred, batch["snr_bin"]))
    cat = {k: torch.cat(v).double().numpy() for k, v in parts.items()}
    labels = model.labels
    rows = []
    print(f"test split of {a.data}: correlation of the labels' errors (r [95% interval])")
    print(
        f"{'pair':<16}{'slice':<8}{'n':>6}{'residuals':>26}{'z':>9}{'rho (interval of r)':>28}{'in':>4}"
        f"{'2-D (rho)':>14}{'2-D (rho 0)':>14}"
    )
    for pair, ((i, p), (j, q)) in enumerate(itertools.combinations(enumerate(labels), 2)):
        for name, sel in bins.snr_slices(cat["snr_bin"].astype(np.int64), high_first=True):
            n = int(sel.sum())
            rr = pearson(cat["resid"][sel, i], cat["resid"][sel, j])
            rz = float(np.corrcoef(cat["z"][sel, i], cat["z"][sel, j])[0, 1])
            rho = float(cat["rho"][sel, pair].mean())
            lo, hi = fisher_interval(rho, n)
            cover = mahalanobis_coverage(cat["z"][sel, i], cat["z"][sel, j], cat["rho"][sel, pair])
            cover0 = mahalanobis_coverage(cat["z"][sel, i], cat["z"][sel, j], 0.0)
            inside = lo <= rz <= hi
            rows.append(
                {
                    "pair": f"{p}-{q}",
                    "slice": name,
                    "n": n,
                    "r_resid": rr,
                    "r_z": rz,
                    "rho": rho,
                    "rho_interval": (lo, hi),
                    "inside": inside,
                    "coverage_2d": cover,
                    "coverage_2d_rho0": cover0,
                }
            )
            fmt = "{:+.3f} [{:+.3f}, {:+.3f}]"
            print(
                f"{p + '-' + q:<16}{name:<8}{n:>6}{fmt.format(*rr):>26}{rz:>+9.3f}{fmt.format(rho, lo, hi):>28}"
                f"{'yes' if inside else 'no':>4}{'{:.1%}/{:.1%}'.format(*cover):>14}{'{:.1%}/{:.1%}'.format(*cover0):>14}"
            )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
