"""What a catalogue says of masked, foreign and in-distribution spectra: the tables of docs/catalogue.md.

    python benchmarks/catalogue_checks.py --ckpt CKPT [--config quickstart] [--data data/synth]
        [--extra NAME=FOLDER ...] [--ood NAME=FOLDER ...] [--work data/checks]
    python benchmarks/catalogue_checks.py --ood_only [--data ...] [--extra ...] [--ood ...]

From the test split of ``--data`` (its pre-noised copy) and the test split of every ``--extra`` dataset
(another generator seed; noise added here with a fixed seed), shards are written as observations:

- ``base``      the spectra as they are;
- ``random5``   5 % of each star's pixels masked at random (``dataset/arrays/mask/value``);
- ``block``     one block of 100 pixels centred on Ca II 8542 A masked;
- ``reversed``  flux and error reversed in wavelength;
- ``noise``     pure noise, ``noise_level * error * N(0, 1)`` (no star);

and the test split of every ``--ood`` dataset (stars outside the training labels, ``moe data synth --teff
6500 8000`` ...), noised the same way. One ``moe predict`` of the checkpoint over all of them writes one
catalogue; each shard's rows are then scored: log g R^2 and sigma calibration (z std, share of |z| <= 1),
overall and per SNR bin (the bin of the star in ``base``, so every variant is scored on the same stars),
and the share of stars with each flag bit. Prints Markdown tables.

``--ood_only`` needs no checkpoint: the ``ood_score`` of every shard as ``predict`` computes it (the dataset's
catalogue reference, each star's observed SNR and its bin's thresholds), the share above 1 overall and per SNR
bin (the star's own bin).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from moe.catalogue.flags import CatalogueFlag
from moe.cli import cli_main
from moe.data.folder import SpectraFolder
from moe.data.shards import MASK_KEY, find_split, read_block, read_params, read_wave, write_shard

CA_8542 = 8542.09
NOISE_SEED = 2024


def observed_test(folder: str, pre_noised: bool, noise_level: float) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Noisy flux, error [N, D] and the parameter table of a dataset's test split."""
    if pre_noised:
        f = SpectraFolder(folder, noise_level=noise_level, synth=None)
        parts = list(f.stream("test", batch_size=4096).all_batches())
        flux = np.concatenate([p["flux"].numpy() for p in parts])
        error = np.concatenate([p["error"].numpy() for p in parts])
        params = pd.concat([read_params(p) for p in f.test_set.paths], ignore_index=True)
        return flux, error, params
    path = find_split(folder, "test")[0]
    n = len(read_params(path))
    flux, error = read_block(path, 0, n)
    rng = np.random.default_rng(NOISE_SEED)
    return flux + noise_level * error * rng.standard_normal(flux.shape).astype(np.float32), error, read_params(path)


def write(path: Path, wave, flux, error, params, mask: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_shard(path, wave, flux, error, params, labelled=False)
    if mask is not None:
        with h5py.File(path, "a") as f:
            f.create_dataset(MASK_KEY, data=mask.astype(np.uint8))
    return path


def variants(wave, flux, error, params, noise_level: float) -> dict[str, tuple]:
    rng = np.random.default_rng(NOISE_SEED + 1)
    n, d = flux.shape
    random5 = np.zeros((n, d), bool)
    k = int(round(0.05 * d))
    for i in range(n):
        random5[i, rng.choice(d, k, replace=False)] = True
    centre = int(np.argmin(np.abs(wave - CA_8542)))
    block = np.zeros((n, d), bool)
    block[:, centre - 50 : centre + 50] = True
    noise = noise_level * error * rng.standard_normal(flux.shape).astype(np.float32)
    return {
        "base": (flux, error, params, None),
        "random5": (flux, error, params, random5),
        "block": (flux, error, params, block),
        "reversed": (flux[:, ::-1].copy(), error[:, ::-1].copy(), params, None),
        "noise": (noise, error, params, None),
    }


def score(df: pd.DataFrame, bins: np.ndarray) -> dict:
    out = {}
    for name in ("all", "H", "M", "L", "X"):
        m = np.ones(len(df), bool) if name == "all" else bins == name
        d = df[m]
        y, p, s = d["log_g_true"].to_numpy(), d["log_g_pred"].to_numpy(), d["log_g_sigma"].to_numpy()
        ok = np.isfinite(p)
        z = (p[ok] - y[ok]) / s[ok]
        r2 = 1 - np.sum((p[ok] - y[ok]) ** 2) / np.sum((y[ok] - y[ok].mean()) ** 2) if ok.sum() > 1 else np.nan
        out[name] = (r2, z.std() if len(z) else np.nan, np.mean(np.abs(z) <= 1) if len(z) else np.nan, int(m.sum()))
    return out


def flag_shares(df: pd.DataFrame) -> dict:
    f = df["flags"].to_numpy()
    shares = {b.name: float(np.mean(f & int(b) > 0)) for b in CatalogueFlag}
    shares["OOD|LABEL_EDGE"] = float(np.mean(f & int(CatalogueFlag.OOD | CatalogueFlag.LABEL_EDGE) > 0))
    shares["n_masked"] = float(df["n_masked"].mean())
    return shares


def ood_shares(shards: dict[tuple[str, str], Path], data: str, noise_level: float, work: Path) -> None:
    """Print the OOD share of every shard, overall and per SNR bin, from the reference of ``data``."""
    import torch

    from moe.data.bins import SNR_BIN_NAMES, snr_bin
    from moe.data.shards import read_observed
    from moe.data.stream import observed_snr
    from moe.prepare.reference import load_or_build

    folder = SpectraFolder(data, noise_level=noise_level, synth=None)
    ref = load_or_build(folder, Path(data) / "experts")
    print("\nthresholds (distance, chi2) per SNR bin:", dict(zip(SNR_BIN_NAMES, ref.spectra.ood_scale.tolist())))
    print("\n| data | variant | stars | OOD | OOD per SNR bin H / M / L / X |")
    print("|---|---|---|---|---|")
    for (name, v), path in shards.items():
        n = len(read_params(path, labelled=False))
        scores, snrs = [], []
        for lo in range(0, n, 1024):
            flux, error, usable = read_observed(path, lo, min(lo + 1024, n))
            snr = observed_snr(flux, error, usable, noise_level)
            t = (torch.from_numpy(flux), torch.from_numpy(error), torch.from_numpy(usable))
            scores.append(ref.spectra.ood_score(*t, noise_level, torch.from_numpy(snr_bin(snr))).numpy())
            snrs.append(snr)
        ood, bins = np.concatenate(scores) > ref.ood_threshold, snr_bin(np.concatenate(snrs))
        per = " / ".join(f"{ood[bins == b].mean():.1%}" if (bins == b).any() else "-" for b in (3, 2, 1, 0))
        print(f"| {name} | {v} | {n} | {ood.mean():.1%} | {per} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="the checkpoint to predict with (not needed with --ood_only)")
    ap.add_argument("--ood_only", action="store_true", help="only the OOD score of every shard (no checkpoint)")
    ap.add_argument("--config", default="moe/configs/quickstart.yaml")
    ap.add_argument("--data", default="data/synth")
    ap.add_argument("--noise_level", type=float, default=1.0)
    ap.add_argument("--extra", nargs="*", default=[], help="NAME=FOLDER: another in-distribution dataset")
    ap.add_argument("--ood", nargs="*", default=[], help="NAME=FOLDER: stars outside the training labels")
    ap.add_argument("--work", default="data/checks")
    ap.add_argument(
        "--variants", nargs="*", default=None, help="only these variants (default: all; base is always made)"
    )
    a = ap.parse_args()
    work = Path(a.work)
    wave = read_wave(find_split(a.data, "test")[0])
    shards: dict[tuple[str, str], Path] = {}
    sets = [("embedded", a.data, True)] + [(*e.split("=", 1), False) for e in a.extra]
    for name, folder, pre in sets:
        flux, error, params = observed_test(folder, pre, a.noise_level)
        for v, (fl, er, pa, mask) in variants(wave, flux, error, params, a.noise_level).items():
            if a.variants is not None and v != "base" and v not in a.variants:
                continue
            shards[(name, v)] = write(work / name / v / "dataset.h5", wave, fl, er, pa, mask)
    for e in a.ood:
        name, folder = e.split("=", 1)
        flux, error, params = observed_test(folder, False, a.noise_level)
        shards[(name, "labels outside")] = write(work / name / "dataset.h5", wave, flux, error, params)
    if a.ood_only:
        ood_shares(shards, a.data, a.noise_level, work)
        return
    if a.ckpt is None:
        ap.error("--ckpt is needed (or --ood_only)")
    out = work / "catalogue.fits"
    cli_main(
        [
            "predict",
            "--config",
            a.config,
            "--ckpt_path",
            a.ckpt,
            "--data.data_dir",
            a.data,
            "--data.noise_level",
            str(a.noise_level),
            "--data.predict_path",
            "[" + ", ".join(str(p) for p in shards.values()) + "]",
            "--predict_writer.output",
            str(out),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    from astropy.table import Table

    cat = Table.read(out).to_pandas()
    cat["shard"] = cat["shard"].str.decode("ascii") if cat["shard"].dtype == object else cat["shard"]
    by_shard = {key: cat[cat["shard"].astype(str) == str(p)].reset_index(drop=True) for key, p in shards.items()}
    print("\n### Masked pixels: log g R^2, z std, |z| <= 1 (bins of the unmasked star)\n")
    print("| data | variant | slice | stars | R^2 | ΔR^2 | z std | abs(z) <= 1 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, _, _ in sets:
        base = by_shard[(name, "base")]
        bins = base["snr_bin"].astype(str).to_numpy()
        ref = score(base, bins)
        for v in [v for v in ("base", "random5", "block") if (name, v) in by_shard]:
            res = score(by_shard[(name, v)], bins)
            for sl, (r2, zs, c1, n) in res.items():
                print(f"| {name} | {v} | {sl} | {n} | {r2:.4f} | {r2 - ref[sl][0]:+.4f} | {zs:.3f} | {c1:.1%} |")
    print("\n### Flags: share of stars with each bit\n")
    bits = [b.name for b in CatalogueFlag] + ["OOD|LABEL_EDGE", "n_masked"]
    print("| data | variant | " + " | ".join(bits) + " |")
    print("|---|---|" + "---|" * len(bits))
    for (name, v), df in by_shard.items():
        s = flag_shares(df)
        cells = [f"{s[b]:.1%}" if b != "n_masked" else f"{s[b]:.0f}" for b in bits]
        print(f"| {name} | {v} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
