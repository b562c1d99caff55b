"""A fitted set of expert families, saved with the fingerprint of the data it came from.

A bundle holds the experts of every label of ``FitConfig.labels`` (:class:`ExpertBundle`), each family
for the labels it was fitted for (``FitConfig.family_labels``; by default all of them).
A bundle's file is ``<data_dir>/experts/experts-<key>.pt`` (:func:`bundle_path`) where ``key``
hashes the data fingerprint (train and val shards with sizes and rows, noise level, val seed) and
the fit config. Loading a file made from other data or another config is an
:class:`ExpertsMismatchError`, never a silent refit (fit-on-first-use is
:func:`moe.experts.cache.load_or_fit`). Files are written atomically (:mod:`moe.shared.atomic`) and
read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moe.data.folder import SpectraFolder
from moe.experts import groups
from moe.experts.fit import FamilyFit, FitConfig, fit_families
from moe.experts.ridge_experts import RidgeExperts
from moe.experts.scores import r2_from_sums
from moe.shared.atomic import AtomicFile, write_text
from moe.shared.keys import json_key

log = logging.getLogger(__name__)
BUNDLE_VERSION = 3  # 3: every label (fits per label, label stats)


class ExpertsMismatchError(ValueError):
    """An experts file that does not belong to the data or config at hand."""


class LabelNotFittedError(ExpertsMismatchError):
    """A family asked for a label it was not fitted for (``FitConfig.family_labels`` left it out)."""

    def __init__(self, family: str, label: str, have: tuple[str, ...], where: str = ""):
        super().__init__(
            f"{where}the {family} experts were fitted for {', '.join(have)} only, not {label} "
            f"(FitConfig.family_labels): fit {family} for {label} too, or ask {family} for {', '.join(have)}"
        )


def bundle_key(fingerprint: dict, cfg: FitConfig) -> str:
    return json_key({"data": fingerprint, "fit": cfg.key_dict(), "version": BUNDLE_VERSION})


@dataclass
class ExpertBundle:
    """Families of experts, per label, plus the PCA basis of the same pass.

    ``fits[label][family]`` holds one label's experts of one family (:class:`~moe.experts.fit.FamilyFit`);
    every label has the global family and every family fitted for it (:meth:`family_labels`; by default
    all), with the same groups and training rows but its own alphas. Shapes: G groups, L labels, D pixels.
    """

    fits: dict[str, dict[str, FamilyFit]]  # label -> family -> FamilyFit
    pca_mean: np.ndarray  # [D]
    pca_components: np.ndarray  # [k, D]
    pca_variance: np.ndarray  # [k]
    wave: np.ndarray  # [D]
    fingerprint: dict
    config: FitConfig
    timings: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return bundle_key(self.fingerprint, self.config)

    @property
    def labels(self) -> tuple[str, ...]:
        """The labels fitted, in the order of :meth:`weights` (``FitConfig.labels``)."""
        return tuple(self.fits)

    @property
    def family_names(self) -> tuple[str, ...]:
        """The families fitted, in the fit's order (global first), each for one label or more."""
        return tuple(f for f in groups.FAMILIES if any(f in fams for fams in self.fits.values()))

    def family_labels(self, family: str) -> tuple[str, ...]:
        """The labels ``family`` was fitted for, in :attr:`labels` order (all of them unless
        ``FitConfig.family_labels`` named fewer)."""
        return tuple(label for label, fams in self.fits.items() if family in fams)

    def family(self, family: str, label: str = "log_g") -> FamilyFit:
        """One label's experts of one family (weight [G, D], alphas [G], validation sums, the alpha path); a
        family asked for a label it was not fitted for is a :class:`LabelNotFittedError` naming both."""
        if label not in self.fits:
            raise KeyError(f"label {label!r} was not fitted (have {list(self.labels)})")
        if family not in self.family_names:
            raise KeyError(f"family {family!r} was not fitted (have {list(self.family_names)})")
        if family not in self.fits[label]:
            raise LabelNotFittedError(family, label, self.family_labels(family))
        return self.fits[label][family]

    def experts(self, family: str, label: str = "log_g") -> RidgeExperts:
        """One label's experts of ``family`` as a :class:`RidgeExperts` of that label (weight [G, 1, D], bias [G, 1])."""
        f = self.family(family, label)
        return RidgeExperts.from_arrays(f.weight, f.bias, f.names, labels=(label,))

    def weights(self, family: str) -> tuple[np.ndarray, np.ndarray]:
        """Every label's experts of ``family``: (weight [G, L, D], bias [G, L]), float64, for the L labels of
        :meth:`family_labels` in their order."""
        fams = [self.family(family, label) for label in self.family_labels(family)]
        return np.stack([f.weight for f in fams], axis=1), np.stack([f.bias for f in fams], axis=1)

    @property
    def label_stats(self) -> dict[str, tuple[float, float]]:
        """Per label, (mean, population std) over the training rows of the fit (from the pass's sums), for
        standardised targets."""
        return {label: (float(f["global"].y_mean[0]), float(f["global"].y_std[0])) for label, f in self.fits.items()}

    def stand_ins(self) -> list[tuple[str, str, int]]:
        """(family, group, training rows) of every group that had too few rows and is the global expert
        (the same groups for every label the family holds)."""
        out = []
        for fam in self.family_names:
            f = self.fits[self.family_labels(fam)[0]][fam]
            out += [
                (fam, name, int(f.n_train[g]))
                for g, name in enumerate(f.names)
                if f.fallback and f.fallback[g] == "global"
            ]
        return out

    def alpha_table(self) -> pd.DataFrame:
        """One row per label and expert: training/val counts, chosen alpha, val R^2 at it, fallback."""
        rows = []
        alphas = np.asarray(self.config.alphas)
        for label, fams in self.fits.items():
            for fam, f in fams.items():
                for g, name in enumerate(f.names):
                    a = int(np.flatnonzero(alphas == f.alpha[g])[0])
                    r2 = r2_from_sums(f.val_sse[g, a], f.val_sst[g], f.n_val[g])
                    rows.append(
                        {
                            "label": label,
                            "family": fam,
                            "expert": name,
                            "n_train": int(f.n_train[g]),
                            "n_val": int(f.n_val[g]),
                            "alpha": float(f.alpha[g]),
                            "val_r2": float(r2),
                            "fallback": f.fallback[g] if f.fallback else "",
                        }
                    )
        return pd.DataFrame(rows)

    # ---- persistence --------------------------------------------------------------
    def to_dict(self) -> dict:
        fits = {label: {name: _family_dict(f) for name, f in fams.items()} for label, fams in self.fits.items()}
        return {
            "version": BUNDLE_VERSION,
            "labels": list(self.labels),
            "fits": fits,
            "pca_mean": torch.from_numpy(self.pca_mean),
            "pca_components": torch.from_numpy(self.pca_components),
            "pca_variance": torch.from_numpy(self.pca_variance),
            "wave": torch.from_numpy(np.asarray(self.wave, float)),
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "config": json.dumps(
                self.config.key_dict() | {"block_rows": self.config.block_rows, "n_draws": self.config.n_draws},
                sort_keys=True,
            ),
            "timings": json.dumps(self.timings),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bundle (and its alpha table as CSV) atomically; a failed write is one WriteError naming the file."""
        path = Path(path)
        # torch.save reports a full disk as a RuntimeError of its zip writer: every error here is a write error
        with AtomicFile(path, "the experts file", body_failures=(OSError, RuntimeError)) as tmp:
            torch.save(self.to_dict(), tmp)
        write_text(path.with_suffix(".alphas.csv"), self.alpha_table().to_csv(index=False), "the alpha table")
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, fingerprint: dict | None = None, config: FitConfig | None = None
    ) -> ExpertBundle:
        """Load ``path``; with ``fingerprint``/``config`` given, a mismatch is an error."""
        path = Path(path)
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ExpertsMismatchError(f"{path}: not a readable experts file ({exc})") from exc
        if not isinstance(d, dict) or d.get("version") != BUNDLE_VERSION:
            raise ExpertsMismatchError(
                f"{path}: experts file version {d.get('version') if isinstance(d, dict) else '?'}, "
                f"expected {BUNDLE_VERSION}"
            )
        stored_fp = json.loads(d["fingerprint"])
        cfg_d = json.loads(d["config"])
        stored_cfg = FitConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_d.items()})
        if fingerprint is not None and stored_fp != json.loads(json.dumps(fingerprint, sort_keys=True)):
            diff = sorted(
                k
                for k in set(stored_fp) | set(fingerprint)
                if stored_fp.get(k) != json.loads(json.dumps(fingerprint)).get(k)
            )
            raise ExpertsMismatchError(
                f"{path}: experts were fitted on other data (fingerprint differs in {diff}); "
                "refusing to use them -- remove the file or point to the right data"
            )
        if config is not None and stored_cfg.key_dict() != config.key_dict():
            diff = sorted(k for k, v in config.key_dict().items() if stored_cfg.key_dict().get(k) != v)
            raise ExpertsMismatchError(f"{path}: experts were fitted with another config (differs in {diff})")
        fits = {label: {name: _family_from_dict(f) for name, f in d["fits"][label].items()} for label in d["labels"]}
        return cls(
            fits,
            d["pca_mean"].numpy(),
            d["pca_components"].numpy(),
            d["pca_variance"].numpy(),
            d["wave"].numpy(),
            stored_fp,
            stored_cfg,
            json.loads(d["timings"]),
        )


def _family_dict(f: FamilyFit) -> dict:
    """One label's family as tensors and lists (what ``torch.load(weights_only=True)`` reads back)."""
    out = {
        "names": list(f.names),
        "weight": torch.from_numpy(f.weight),
        "bias": torch.from_numpy(f.bias),
        "alpha": torch.from_numpy(np.asarray(f.alpha, float)),
        "n_train": torch.from_numpy(np.asarray(f.n_train, float)),
        "n_val": torch.from_numpy(np.asarray(f.n_val, float)),
        "val_sse": torch.from_numpy(f.val_sse),
        "val_sst": torch.from_numpy(np.asarray(f.val_sst, float)),
        "fallback": list(f.fallback),
    }
    for key in ("path_weight", "path_bias", "y_mean", "y_std"):
        if getattr(f, key) is not None:
            out[key] = torch.from_numpy(np.ascontiguousarray(getattr(f, key), dtype=float))
    return out


def _family_from_dict(f: dict) -> FamilyFit:
    def optional(key: str) -> np.ndarray | None:
        return f[key].numpy() if key in f else None

    return FamilyFit(
        list(f["names"]),
        f["weight"].numpy(),
        f["bias"].numpy(),
        f["alpha"].numpy(),
        f["n_train"].numpy(),
        f["n_val"].numpy(),
        f["val_sse"].numpy(),
        f["val_sst"].numpy(),
        list(f["fallback"]),
        optional("path_weight"),
        optional("path_bias"),
        optional("y_mean"),
        optional("y_std"),
    )


def wide_alpha_table(table: pd.DataFrame) -> pd.DataFrame:
    """The alpha table with one row per expert and, per label, its alpha and validation R^2 side by side (empty
    for a label the expert's family was not fitted for)."""
    keys = ["family", "expert", "n_train", "n_val", "fallback"]
    labels = list(dict.fromkeys(table["label"]))
    wide = table.pivot(index=keys, columns="label", values=["alpha", "val_r2"])
    wide = wide[[(what, label) for label in labels for what in ("alpha", "val_r2")]]
    wide.columns = [f"{what} {label}" for what, label in wide.columns]
    order = table.drop_duplicates(keys).set_index(keys).index  # the families' order, not sorted
    return wide.reindex(order).reset_index().set_index(["family", "expert"])


def default_dir(data_dir: str | os.PathLike) -> Path:
    """The default cache folder of expert bundles of a dataset folder."""
    return Path(data_dir) / "experts"


def bundle_path(folder: SpectraFolder, cfg: FitConfig, experts_dir: str | os.PathLike | None = None) -> Path:
    """Where the bundle of ``folder``'s data fitted with ``cfg`` is cached: ``<experts_dir>/experts-<key>.pt``."""
    root = Path(experts_dir) if experts_dir is not None else default_dir(folder.data_dir)
    return root / f"experts-{bundle_key(folder.fingerprint(), cfg)}.pt"


def default_path(folder: SpectraFolder, cfg: FitConfig) -> Path:
    return bundle_path(folder, cfg)


def fit_bundle(folder: SpectraFolder, cfg: FitConfig = FitConfig(), progress: bool = True) -> ExpertBundle:
    """Fit all requested families on ``folder`` (no caching)."""
    fits, (mean, comps, var), timings = fit_families(folder, cfg, progress)
    return ExpertBundle(fits, mean, comps, var, folder.wave, folder.fingerprint(), cfg, timings)
