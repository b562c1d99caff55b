"""What a catalogue compares each star with: the training spectra's low-rank model, the OOD threshold and the
training labels' ranges, built once per dataset and cached.

- :class:`~moe.features.lowrank.LowRankSpectra` of rank ``rank`` fitted on ``fit_rows`` clean training
  spectra (whole blocks drawn at random, the same rows in every run): their mean, the top principal axes
  (``torch.svd_lowrank``) with the variance of each star's coefficient, each pixel's variance left over,
  and the leading ``N_COEF`` coefficients of those spectra (the OOD distance's neighbours);
- the OOD thresholds per SNR bin, from stars of the training distribution the model was not fitted on -- the
  validation split's pre-noised spectra and up to ``CAL_ROWS`` training rows outside the fit, noised with a
  fixed seed, each clipped at 0 as an observation is and binned by its observed SNR: chi^2's at its 99.9 %
  quantile, the distance's such that 0.5 % of the bin's stars exceed one or the other (``ood_score > 1``); a
  bin with fewer than ``MIN_BIN_ROWS`` such stars (tiny datasets) takes the thresholds of all of them;
- the range ``[min, max]`` of every label in the training parameter tables (``LABEL_EDGE``).

Cached as ``reference_<key>.npz`` beside the expert bundles, keyed by the data fingerprint and the settings;
a file of other data or settings is rebuilt, with a log line saying why.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from moe.data.bins import N_SNR_BINS, snr_bin
from moe.data.folder import SpectraFolder
from moe.data.shards import LABEL_COLUMNS, read_params
from moe.features.lowrank import LowRankSpectra
from moe.shared.atomic import AtomicFile

log = logging.getLogger(__name__)

REFERENCE_VERSION = 3
OOD_SHARE = 0.005  # share of training-like stars above the OOD threshold
CHI2_SHARE = 0.001  # of which above the chi^2 threshold
N_COEF = 8  # leading coefficients the OOD distance compares
RANK = 32
FIT_ROWS = 16_384
FIT_SEED = 21
CAL_ROWS = 16_384  # training rows outside the fit that set the OOD thresholds (with the validation split)
CAL_SEED = 22  # their noise
MIN_BIN_ROWS = 400  # an SNR bin with fewer calibration stars takes the thresholds of all of them


@dataclass
class CatalogueReference:
    """The training set as a catalogue sees it (module docstring)."""

    spectra: LowRankSpectra
    ood_threshold: float
    label_ranges: dict[str, tuple[float, float]]  # training label -> (min, max)
    data_fingerprint: str


def _key(folder: SpectraFolder, rank: int, fit_rows: int) -> dict:
    return {
        "version": REFERENCE_VERSION,
        "data": folder.fingerprint_hash(),
        "rank": int(rank),
        "fit_rows": int(fit_rows),
        "seed": FIT_SEED,
        "ood_share": OOD_SHARE,
        "chi2_share": CHI2_SHARE,
        "n_coef": N_COEF,
        "cal_rows": CAL_ROWS,
        "cal_seed": CAL_SEED,
        "min_bin_rows": MIN_BIN_ROWS,
    }


def reference_path(folder_cache: Path, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return folder_cache / f"reference_{digest}.npz"


def load_or_build(
    folder: SpectraFolder, cache: str | Path, rank: int = RANK, fit_rows: int = FIT_ROWS
) -> CatalogueReference:
    """The reference of ``folder`` from its cache file in the folder ``cache``, built (under a file lock) when
    there is none for this data and these settings."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    key = _key(folder, rank, fit_rows)
    path = reference_path(cache, key)
    with FileLock(str(cache / ".reference.lock")):
        found = _load(path, key, folder.n_pixels)
        if found is not None:
            return found
        log.info("building the catalogue reference %s (low-rank model of the training spectra, OOD threshold)", path)
        ref = build(folder, rank, fit_rows)
        buf = io.BytesIO()
        np.savez(
            buf,
            key=json.dumps(key),
            mean=ref.spectra.mean.numpy(),
            components=ref.spectra.components.numpy(),
            variance=ref.spectra.variance.numpy(),
            resid_var=ref.spectra.resid_var.numpy(),
            train_coef=ref.spectra.train_coef.numpy(),
            ood_scale=ref.spectra.ood_scale.numpy(),
            ood_threshold=ref.ood_threshold,
            label_ranges=json.dumps(ref.label_ranges),
        )
        with AtomicFile(path, "the catalogue reference", body_failures=(OSError,)) as tmp:
            tmp.write_bytes(buf.getvalue())
        return ref


def _load(path: Path, key: dict, n_pixels: int) -> CatalogueReference | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            if json.loads(str(z["key"])) != key:
                log.info("rebuilding %s: made for other data or settings", path)
                return None
            spectra = LowRankSpectra(n_pixels, int(z["components"].shape[0]), *z["train_coef"].shape)
            for name in ("mean", "components", "variance", "resid_var", "train_coef", "ood_scale"):
                getattr(spectra, name).copy_(torch.from_numpy(z[name]))
            ranges = {k: tuple(v) for k, v in json.loads(str(z["label_ranges"])).items()}
            return CatalogueReference(spectra, float(z["ood_threshold"]), ranges, key["data"])
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        log.info("rebuilding %s: unreadable (%s)", path, exc)
        return None


@torch.no_grad()
def build(folder: SpectraFolder, rank: int = RANK, fit_rows: int = FIT_ROWS) -> CatalogueReference:
    """Fit the low-rank model, set the OOD threshold and read the label ranges (module docstring)."""
    stream = folder.stream("train", shuffle=False, batch_size=4096)
    batches = list(stream.sample_batches(fit_rows, FIT_SEED))
    flux = torch.cat([b["flux"] for b in batches])[:fit_rows].double()
    fit_ids = {int(r) for r in torch.cat([b["row"] for b in batches])[:fit_rows]}
    del batches
    mean = flux.mean(0)
    flux -= mean
    q = min(rank + 10, *flux.shape)
    _, s, v = torch.svd_lowrank(flux, q=q, niter=6, M=None)
    r = min(rank, q)
    comps = v[:, :r].T.contiguous()  # [R, D]
    variance = s[:r].square() / max(len(flux) - 1, 1)
    resid = flux - (flux @ comps.T) @ comps
    resid_var = resid.square().mean(0)
    spectra = LowRankSpectra(folder.n_pixels, r, len(flux), N_COEF)
    spectra.mean.copy_(mean)
    spectra.components.copy_(comps)
    spectra.variance.copy_(variance)
    spectra.resid_var.copy_(resid_var)
    spectra.train_coef.copy_(flux @ comps[: spectra.train_coef.shape[1]].T)
    del flux, resid
    distance, chi2, snr = calibration_parts(folder, spectra, fit_ids, fit_rows)
    scale = ood_thresholds(distance, chi2)
    bins = snr_bin(snr)
    for b in range(N_SNR_BINS):
        if (bins == b).sum() >= MIN_BIN_ROWS:
            scale[b] = ood_thresholds(distance[bins == b], chi2[bins == b])[0]
    spectra.ood_scale.copy_(torch.from_numpy(scale))
    threshold = 1.0  # ood_score is in units of the thresholds
    return CatalogueReference(spectra, threshold, training_label_ranges(folder), folder.fingerprint_hash())


def ood_thresholds(distance: np.ndarray, chi2: np.ndarray) -> np.ndarray:
    """[N_SNR_BINS, 2] thresholds (every row the same) of distance and chi^2 such that ``CHI2_SHARE`` of the
    stars exceed chi^2's and ``OOD_SHARE`` one or the other."""
    t_chi2 = float(np.quantile(chi2, 1 - CHI2_SHARE))
    rest = distance[chi2 <= t_chi2]
    t_distance = float(np.quantile(rest, 1 - (OOD_SHARE - CHI2_SHARE) * len(chi2) / max(len(rest), 1)))
    return np.tile([t_distance, t_chi2], (N_SNR_BINS, 1))


@torch.no_grad()
def calibration_parts(
    folder: SpectraFolder, spectra: LowRankSpectra, fit_ids: set[int], fit_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OOD distance, chi^2 and SNR [M] of stars of the training distribution the model was not fitted on: the
    validation split's pre-noised spectra and up to ``CAL_ROWS`` training rows outside the fit (noise drawn with
    ``CAL_SEED``), each clipped at 0 as an observation is on load, its SNR that of an observation."""
    s = folder.noise_level
    train = folder.stream("train", shuffle=False, batch_size=4096).sample_batches(fit_rows + CAL_ROWS, FIT_SEED)
    gen = torch.Generator().manual_seed(CAL_SEED)
    parts = []

    def add(flux: torch.Tensor, error: torch.Tensor) -> None:
        flux = flux.clamp_min(0.0)
        usable = torch.ones_like(flux, dtype=torch.bool)
        distance, chi2 = spectra.ood_parts(flux, error, usable, s)
        y2, e2 = flux.double().square().sum(1), (s * error.double()).square().sum(1).clamp_min(1e-30)
        parts.append(torch.stack([distance, chi2, (y2 / e2 - 1).clamp_min(0).sqrt()], 1))

    for batch in train:  # the fit sample's blocks come first in this larger sample: skip the fitted rows
        keep = torch.tensor([int(r) not in fit_ids for r in batch["row"]], dtype=torch.bool)
        if keep.any():
            flux, error = batch["flux"][keep], batch["error"][keep]
            add(flux + s * error * torch.randn(flux.shape, generator=gen, dtype=flux.dtype), error)
    for batch in folder.stream("val", batch_size=1024).all_batches():
        add(batch["flux"], batch["error"])
    distance, chi2, snr = torch.cat(parts).numpy().T
    return distance, chi2, snr


def training_label_ranges(folder: SpectraFolder) -> dict[str, tuple[float, float]]:
    """[min, max] of each label over the training rows used (dropped rows left out)."""
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    s = folder.train_set
    for k, info in enumerate(s.infos):
        p = read_params(info.path, info.params_key).iloc[: int(s.counts[k])]
        keep = np.ones(len(p), bool)
        keep[np.asarray(s.dropped[(s.dropped >= s.offsets[k]) & (s.dropped < s.offsets[k + 1])] - s.offsets[k])] = False
        for c in LABEL_COLUMNS:
            v = p[c].to_numpy(np.float64)[keep]
            lo[c] = min(lo.get(c, np.inf), float(v.min()))
            hi[c] = max(hi.get(c, -np.inf), float(v.max()))
    return {c: (lo[c], hi[c]) for c in lo}
