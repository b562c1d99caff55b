"""How far a spectrum can tell a foreign star from the training stars: an upper bound on the OOD share of
docs/catalogue.md ("How far a spectrum can tell").

    python benchmarks/ood_bound.py [--data data/synth] --ood NAME=FOLDER ... [--share 0.005]

For each star of the test split of every ``--ood`` dataset: ``d_min``, the distance of its noise-free spectrum
to the nearest of the noise-free training spectra the catalogue reference is fitted on (the same rows), in
units of the star's own noise ``noise_level * error``. Testing that star's spectrum against that training
spectrum alone (Neyman-Pearson, Gaussian noise) flags it at a false-positive rate ``--share`` with probability
``Phi(d_min - z)``, ``z = Phi^-1(1 - share)``; no test of the training distribution as a whole can do better
on that star, and a finite training sample only raises ``d_min``. Prints the mean of that probability overall
and per SNR bin (the star's clean SNR) and the median ``d_min`` per bin.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.stats import norm

from moe.data.bins import snr_bin
from moe.data.folder import SpectraFolder
from moe.data.shards import find_split, read_block, read_params
from moe.prepare.reference import FIT_ROWS, FIT_SEED


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/synth")
    ap.add_argument("--noise_level", type=float, default=1.0)
    ap.add_argument("--ood", nargs="+", required=True, help="NAME=FOLDER: stars outside the training labels")
    ap.add_argument("--share", type=float, default=0.005, help="false-positive rate")
    a = ap.parse_args()
    folder = SpectraFolder(a.data, noise_level=a.noise_level, synth=None)
    stream = folder.stream("train", shuffle=False, batch_size=4096)
    train = torch.cat([b["flux"] for b in stream.sample_batches(FIT_ROWS, FIT_SEED)])[:FIT_ROWS]
    train2 = train.square()
    z = norm.ppf(1 - a.share)
    print("| data | bound | per SNR bin H / M / L / X | median d_min H / M / L / X |")
    print("|---|---|---|---|")
    for entry in a.ood:
        name, path = entry.split("=", 1)
        shard = find_split(path, "test")[0]
        snr = read_params(shard)["snr"].to_numpy() / a.noise_level
        flux, error = read_block(shard, 0, len(snr))
        x, w = torch.from_numpy(flux), torch.from_numpy(1.0 / (a.noise_level * error) ** 2)
        d = []
        for lo in range(0, len(x), 500):
            xx, ww = x[lo : lo + 500], w[lo : lo + 500]
            d2 = (ww * xx.square()).sum(1, keepdim=True) - 2 * (ww * xx) @ train.T + ww @ train2.T
            d.append(d2.clamp_min(0).amin(1).sqrt())
        d_min = torch.cat(d).double().numpy()
        power, bins = norm.cdf(d_min - z), snr_bin(snr)
        per = " / ".join(f"{power[bins == b].mean():.1%}" if (bins == b).any() else "-" for b in (3, 2, 1, 0))
        med = " / ".join(f"{np.median(d_min[bins == b]):.2f}" if (bins == b).any() else "-" for b in (3, 2, 1, 0))
        print(f"| {name} | {power.mean():.1%} | {per} | {med} |")


if __name__ == "__main__":
    main()
