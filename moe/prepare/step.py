"""The preparation step: everything a gate needs that is not learned, built once and cached.

``prepare(folder, cfg)`` returns a :class:`Prepared` for one dataset folder, one expert
family and the labels the gate predicts (``cfg.labels``, by default the fit's): the fitted expert bundle (loaded from its fingerprinted cache or fitted, every
family of the fit), the physics windows and PCA basis, the per-row gate-input caches of
every split (which ``folder`` then streams) and the feature standardisation, fitted on the
first ``feature_rows`` training rows with one fixed noise draw, and each expert's
model-error variance per SNR bin on the validation split (:mod:`moe.experts.model_error`). It knows nothing of
Lightning: the CLI and the experiments call it before a trainer runs and hand the result
to :meth:`moe.gates.GatedMoE.load_prepared`.

The data it gets have been checked row by row already: a ``SpectraFolder`` checks every row it
uses when it is built (:mod:`moe.data.row_check`), so bad values stop here before any expert
solve, or are left out with ``bad_rows="drop"``.

Concurrent callers -- two runs on a fresh folder -- take a file lock next to the experts cache:
the first one fits and writes, the others wait and then load what it wrote. The ranks of one run
(DDP, torchrun, SLURM: a torch.distributed process group, :mod:`moe.data.ranks`) prepare together
under one lock that their rank 0 holds: the experts' passes and the per-row caches are split over
them by rows (:func:`moe.experts.bundle.load_or_fit`, :func:`moe.prepare.inputs.attach_inputs`), and
each rank then loads the same files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moe.data import ranks
from moe.data.folder import SpectraFolder
from moe.experts import groups
from moe.experts.bundle import ExpertBundle, ExpertsMismatchError, LabelNotFittedError, bundle_path
from moe.experts.cache import load_or_fit
from moe.experts.fit import FitConfig
from moe.experts.model_error import model_error_variance
from moe.experts.ridge_experts import RidgeExperts
from moe.features import PHYSICS_NAMES, QUALITY_NAMES, PhysicsFeatures, Standardizer
from moe.features.gate_inputs import gate_features, projection_map
from moe.prepare.inputs import attach_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareConfig:
    """What to prepare: the gated family, how the experts are fitted, where they are cached."""

    family: str = "phys"
    fit: FitConfig = field(default_factory=FitConfig)
    experts_dir: str | None = None  # cache folder of expert bundles (default <data_dir>/experts)
    experts_path: str | None = None  # an explicit experts file (must match the data and fit settings)
    feature_rows: int = 20_000
    labels: tuple[str, ...] | None = None  # the labels the gate predicts (None: every label of the fit)

    def __post_init__(self):
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(self.labels))
        if self.family not in groups.FAMILIES:
            raise ValueError(f"unknown expert family {self.family!r}; choose from {groups.FAMILIES}")
        if self.feature_rows < 2:
            raise ValueError(f"feature_rows must be >= 2, got {self.feature_rows}")


@dataclass
class Prepared:
    """The non-learned artefacts of a gate (B batch, K experts, L labels, D pixels)."""

    bundle: ExpertBundle
    family: str
    experts: RidgeExperts  # the gated family [K, L, D]
    global_expert: RidgeExperts  # [1, L, D]
    physics: PhysicsFeatures  # windows of the data's grid, PCA basis
    phys_scaler: Standardizer
    qual_scaler: Standardizer
    model_var: np.ndarray  # [K, L, 4] each expert's model-error variance per label and SNR bin (validation)
    inputs: dict[str, dict[int, Path]]
    data_fingerprint: str
    labels: tuple[str, ...] = ("log_g",)
    label_stats: dict[str, tuple[float, float]] = field(default_factory=dict)  # label -> training (mean, std)

    def attach(self, folder: SpectraFolder) -> None:
        """Have ``folder`` stream these gate-input caches (and noise them with this map)."""
        weight, _ = projection_map(self.experts, self.global_expert, self.physics)
        folder.attach_inputs(self.inputs, weight[:, self.physics.pixels])


def experts_file(folder: SpectraFolder, cfg: PrepareConfig) -> Path:
    """The expert bundle this preparation uses: the explicit file, or the cache entry for the data and settings."""
    return Path(cfg.experts_path) if cfg.experts_path is not None else bundle_path(folder, cfg.fit, cfg.experts_dir)


def prepare(folder: SpectraFolder, cfg: PrepareConfig = PrepareConfig(), progress: bool = True) -> Prepared:
    """Build or load everything a gate over ``cfg.family`` needs on ``folder`` (see module docstring)."""
    path = experts_file(folder, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    progress = progress and ranks.rank_world()[0] == 0
    with ranks.rank_lock(path.parent / ".prepare.lock"):
        return _prepare(folder, cfg, path, progress)


@torch.no_grad()
def _prepare(folder: SpectraFolder, cfg: PrepareConfig, path: Path, progress: bool) -> Prepared:
    if cfg.family not in cfg.fit.families:
        raise ValueError(f"the fit settings make {cfg.fit.families}, not the gated family {cfg.family!r}")
    bundle = load_or_fit(folder, cfg.fit, path, progress=progress)
    labels = cfg.labels if cfg.labels is not None else bundle.labels
    stream_labels(folder, labels)
    physics = PhysicsFeatures(folder.n_pixels)
    physics.set_wave(folder.wave)
    physics.set_pca(bundle.pca_mean, bundle.pca_components)
    experts = label_experts(bundle, cfg.family, labels, path)
    global_expert = label_experts(bundle, "global", labels, path)
    weight, bias = projection_map(experts, global_expert, physics)
    inputs = attach_inputs(folder, weight, bias, physics.pixels, progress=progress, shared=True)
    phys_scaler, qual_scaler = fit_scalers(folder, physics, cfg.feature_rows)
    model_var = validation_model_variance(folder, cfg.family, experts.n_experts, labels)
    return Prepared(
        bundle,
        cfg.family,
        experts,
        global_expert,
        physics,
        phys_scaler,
        qual_scaler,
        model_var,
        inputs,
        folder.fingerprint_hash(),
        labels,
        label_statistics(bundle, labels),
    )


def stream_labels(folder: SpectraFolder, labels: tuple[str, ...]) -> None:
    """Have ``folder``'s streams yield ``labels`` too (any parameter-table column the gate predicts)."""
    folder.labels = tuple(dict.fromkeys((*folder.labels, *labels)))


def label_experts(bundle: ExpertBundle, family: str, labels: tuple[str, ...], path: Path) -> RidgeExperts:
    """The experts of ``family`` for ``labels`` (a subset of the bundle's, in this order) [K, L, D]; a label the
    bundle was not fitted for is one error naming ``--model.labels`` and the experts file ``path``, one the family
    was not fitted for (``FitConfig.family_labels``) one naming the family and the label."""
    have = bundle.labels
    missing = [name for name in labels if name not in have]
    if missing:
        raise ExpertsMismatchError(
            f"{path}: --model.labels asks for {', '.join(missing)}, but these experts were fitted for "
            f"{', '.join(have)} only: drop --model.experts_path or fit experts for those labels"
        )
    own = bundle.family_labels(family)
    for name in labels:
        if name not in own:
            raise LabelNotFittedError(family, name, own, where=f"{path}: ")
    weight, bias = bundle.weights(family)  # [G, L_family, D], [G, L_family]
    idx = [own.index(name) for name in labels]
    return RidgeExperts.from_arrays(weight[:, idx], bias[:, idx], bundle.family(family).names, labels)


def label_statistics(bundle: ExpertBundle, labels: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """Training mean and std of each label (``bundle.label_stats``: from the statistics pass)."""
    stats = bundle.label_stats
    return {name: (float(stats[name][0]), float(stats[name][1])) for name in labels}


def validation_model_variance(
    folder: SpectraFolder, family: str, n_experts: int, labels: tuple[str, ...] = ("log_g",)
) -> np.ndarray:
    """Each expert's model-error variance [K, L, 4] per label and SNR bin, from the cached validation inputs
    (:func:`moe.experts.model_error.model_error_variance`, label by label)."""
    n = len(labels)
    kl = n_experts * n
    parts = {k: [] for k in ("y", "pred", "var", "group", "snr_bin")}
    for batch in folder.stream("val", batch_size=4096, cached=True).all_batches():  # all rows on every rank
        parts["y"].append(torch.stack([batch[name] for name in labels], -1).numpy())
        parts["pred"].append(batch["proj"][:, :kl].unflatten(1, (n_experts, n)).numpy())
        parts["var"].append(folder.noise_level**2 * batch["var"][:, :kl].unflatten(1, (n_experts, n)).numpy())
        parts["group"].append(groups.group_of(family, batch["phys_bin"], batch["snr_bin"]).numpy())
        parts["snr_bin"].append(batch["snr_bin"].numpy())
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    per_label = [
        model_error_variance(cat["y"][:, i], cat["pred"][..., i], cat["var"][..., i], cat["group"], cat["snr_bin"])
        for i in range(n)
    ]
    return np.stack(per_label, 1)


def fit_scalers(folder: SpectraFolder, physics: PhysicsFeatures, rows: int) -> tuple[Standardizer, Standardizer]:
    """Feature standardisation from the first ``rows`` cached training rows with one fixed noise draw
    (the same rows and draw on every DDP rank, so every rank gets the same buffers)."""
    gen = torch.Generator().manual_seed(0)
    phys, qual, seen = [], [], 0
    for batch in folder.stream("train", shuffle=False, batch_size=1024, cached=True).all_batches():
        p, q = gate_features(physics, folder.add_noise(batch, gen))
        phys.append(p[: rows - seen])
        qual.append(q[: rows - seen])
        seen += len(phys[-1])
        if seen >= rows:
            break
    return Standardizer(len(PHYSICS_NAMES)).fit(phys), Standardizer(len(QUALITY_NAMES)).fit(qual)


def describe(prepared: Prepared) -> dict:
    """A short, JSON-able account of what was prepared (for logs and reports)."""
    bundle, alphas = prepared.bundle, {}
    for f in bundle.family_names:  # log g's alphas, or the first label's of a family fitted without log g
        own = bundle.family_labels(f)
        alphas[f] = sorted(set(np.asarray(bundle.family(f, "log_g" if "log_g" in own else own[0]).alpha).tolist()))
    return {
        "family": prepared.family,
        "labels": list(prepared.labels),
        "experts": prepared.experts.n_experts,
        "data": prepared.data_fingerprint,
        "window_pixels": prepared.physics.n_window_pixels,
        "alphas": alphas,
    }
