"""What a catalogue compares each star with: the training spectra's low-rank model, the OOD threshold and the
training labels' ranges, built once per dataset and cached.

- :class:`~moe.features.lowrank.LowRankSpectra` of rank ``rank`` fitted on ``fit_rows`` clean training
  spectra (whole blocks drawn at random, the same rows in every run): their mean, the top principal axes
  (``torch.svd_lowrank``) with the variance of each star's coefficient, each pixel's variance left over,
  and the leading ``N_COEF`` coefficients of those spectra (the OOD distance's neighbours);
- the OOD thresholds, from the validation split's pre-noised spectra -- stars of the training distribution
  the model was not fitted on: chi^2's at its 99.9 % quantile, the distance's such that 0.5 % of those stars
  exceed one or the other (``ood_score > 1``);
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

from moe.data.folder import SpectraFolder
from moe.data.shards import LABEL_COLUMNS, read_params
from moe.features.lowrank import LowRankSpectra
from moe.shared.atomic import AtomicFile

log = logging.getLogger(__name__)

REFERENCE_VERSION = 2
OOD_SHARE = 0.005  # share of training-like stars above the OOD threshold
CHI2_SHARE = 0.001  # of which above the chi^2 threshold
N_COEF = 8  # leading coefficients the OOD distance compares
RANK = 32
FIT_ROWS = 16_384
FIT_SEED = 21


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
    flux = torch.cat([b["flux"] for b in stream.sample_batches(fit_rows, FIT_SEED)])[:fit_rows].double()
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
    parts = []
    for batch in folder.stream("val", batch_size=1024).all_batches():
        usable = torch.ones_like(batch["flux"], dtype=torch.bool)
        parts.append(torch.stack(spectra.ood_parts(batch["flux"], batch["error"], usable, folder.noise_level), 1))
    distance, chi2 = torch.cat(parts).numpy().T
    t_chi2 = float(np.quantile(chi2, 1 - CHI2_SHARE))
    rest = distance[chi2 <= t_chi2]
    t_distance = float(np.quantile(rest, 1 - (OOD_SHARE - CHI2_SHARE) * len(chi2) / max(len(rest), 1)))
    spectra.ood_scale.copy_(torch.tensor([t_distance, t_chi2], dtype=torch.float64))
    threshold = 1.0  # ood_score is in units of the thresholds
    return CatalogueReference(spectra, threshold, training_label_ranges(folder), folder.fingerprint_hash())


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
