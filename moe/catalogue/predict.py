"""What ``predict`` computes per star: labels and sigma from the usable pixels, ``n_masked``, ``ood_score``,
``flags`` and, per label, ``<label>_edge`` (which labels set ``LABEL_EDGE``).

A star's masked pixels (:func:`moe.data.shards.read_observed`) are filled from the training spectra's
low-rank model conditioned on its usable pixels (:meth:`moe.features.lowrank.LowRankSpectra.impute`), and
the gate reads the filled spectrum as it reads any other: the experts, the physics windows and PCA1-4 see
the filled flux, the quality statistics the error with each masked pixel's taken from the nearest usable
one. Each expert's noise variance becomes the variance of its output on the filled spectrum about its output
on the clean one -- the usable pixels' noise plus what the imputation does not know -- so the mixed variance,
the variance head and the SNR-bin recalibration carry the cost of the masking into sigma; each pair of labels
gets the error correlation ``rho_<a>_<b>`` of its SNR bin. A star with fewer
than ``MIN_USABLE_FRACTION`` usable pixels gets NaN labels and ``NO_PREDICTION``; nothing stops the catalogue.

``mixture`` is a :class:`~moe.gates.mixture.GatedMixture` (its labels, projection map, physics windows,
``mix_inputs``, ``mix`` and the error correlations, ``correlation`` and ``correlation_names``);
``reference`` a :class:`~moe.prepare.reference.CatalogueReference`. B batch, D pixels, K experts, L labels.
"""

from __future__ import annotations

import torch

from moe.catalogue.flags import (
    LOW_SNR_MAX,
    MASKED_FRACTION,
    MIN_USABLE_FRACTION,
    WINDOW_MASKED_FRACTION,
    CatalogueFlag,
)


def window_masks(physics) -> torch.Tensor:
    """[N, D] bool: the pixels of each physics window (line EW windows, cores, continuum side-bands)."""
    return torch.cat([physics.blue, physics.red, physics.ew_width, physics.core]) != 0


def label_edges(
    labels: dict[str, tuple[torch.Tensor, torch.Tensor]], ranges: dict[str, tuple[float, float]]
) -> dict[str, torch.Tensor]:
    """Per label [B] bool: its prediction lies outside the training range ``ranges[label]`` or within its sigma
    of an edge (``pred - sigma < min`` or ``pred + sigma > max``); False without a prediction or a range."""
    edges = {}
    for name, (pred, sigma) in labels.items():
        edge = torch.zeros_like(pred, dtype=torch.bool)
        if name in ranges:
            lo, hi = ranges[name]
            edge = torch.isfinite(pred) & ((pred - sigma < lo) | (pred + sigma > hi))
        edges[name] = edge
    return edges


def flag_word(
    snr: torch.Tensor,
    masked_share: torch.Tensor,
    window_share: torch.Tensor,
    predicted: torch.Tensor,
    edges: dict[str, torch.Tensor],
    ood: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """The flag word [B] (int64) from the SNR, the masked share of the pixels and of the worst physics window,
    whether a prediction was made, each label's edge test (:func:`label_edges`; ``LABEL_EDGE``: any label) and
    the OOD score."""
    f = torch.zeros_like(snr, dtype=torch.int64)
    f |= torch.where(snr <= LOW_SNR_MAX, int(CatalogueFlag.LOW_SNR), 0)
    masked = (masked_share > MASKED_FRACTION) | (window_share > WINDOW_MASKED_FRACTION)
    f |= torch.where(masked, int(CatalogueFlag.MASKED), 0)
    edge = torch.zeros_like(predicted)
    for e in edges.values():
        edge |= e
    f |= torch.where(edge, int(CatalogueFlag.LABEL_EDGE), 0)
    f |= torch.where(ood > threshold, int(CatalogueFlag.OOD), 0)  # NaN compares False
    f |= torch.where(predicted, 0, int(CatalogueFlag.NO_PREDICTION))
    return f


@torch.no_grad()
def catalogue_rows(mixture, batch: dict, reference) -> dict[str, torch.Tensor]:
    """One batch of spectra (``flux, error [B, D]``, optional ``usable [B, D]``) as catalogue values."""
    flux, error = batch["flux"], batch["error"]
    usable = batch.get("usable")
    if usable is None:
        usable = torch.ones_like(flux, dtype=torch.bool)
    noise_level = float(mixture.noise_level)
    n_pixels = flux.shape[1]
    n_usable = usable.sum(1)
    predicted = n_usable >= MIN_USABLE_FRACTION * n_pixels
    fit_usable = usable | ~predicted[:, None]  # rows without a prediction: any finite numbers, NaN'd below
    spectra = reference.spectra.to(flux.device)
    weight, _ = mixture.projection()
    filled, var = spectra.impute(flux, error, fit_usable, noise_level, weight)
    k, n = mixture.experts.n_experts, len(mixture.labels)
    noise_var = var[:, : k * n].unflatten(1, (k, n)).to(flux.dtype)  # [B, K, L]
    out = mixture.mix(mixture.mix_inputs(batch | {"flux": filled}, noise_var=noise_var))
    ood = spectra.ood_score(flux, error, usable, noise_level, batch["snr_bin"])
    masked = ~usable
    windows = window_masks(mixture.physics).to(flux.dtype)
    window_share = (masked.to(flux.dtype) @ windows.T / windows.sum(1)).amax(1)
    nan = torch.tensor(float("nan"), device=flux.device)
    keep = predicted[:, None]
    values = {
        "weights": torch.where(keep[..., None], out.weights, nan),  # [B, L, K]
        "expert_preds": torch.where(keep[..., None], out.expert_preds, nan),  # [B, K, L]
        "entropy": torch.where(keep, out.entropy, nan),  # [B, L]
    }
    labels = {}
    for i, name in enumerate(mixture.labels):
        pred, sigma = torch.where(predicted, out.pred[:, i], nan), torch.where(predicted, out.sigma[:, i], nan)
        labels[name] = (pred, sigma)
        truth = batch[name] if name in batch else torch.full_like(pred, float("nan"))
        values |= {f"{name}_pred": pred, f"{name}_sigma": sigma, f"{name}_true": truth}
    rho = torch.where(keep, mixture.correlation(out.pred, batch["snr_bin"]), nan)  # [B, P]
    values |= {name: rho[:, p] for p, name in enumerate(mixture.correlation_names)}
    edges = label_edges(labels, reference.label_ranges)
    flags = flag_word(
        batch["snr"], masked.sum(1) / n_pixels, window_share, predicted, edges, ood, reference.ood_threshold
    )
    values |= {f"{name}_edge": edge for name, edge in edges.items()}
    return values | {"n_masked": masked.sum(1), "ood_score": ood, "flags": flags}
