"""The recalibration of sigma: its buffers, its calibration sample, its fit and how it is applied.

``sigma = scale_b * ref_b * (spread / ref_b) ** gamma * f_bc`` per SNR bin b and cell c of the star's
standardised prediction within the bin (:mod:`moe.gates.sigma_map`), for each label on its own (the map,
its exponent, the cells and the validation check are fitted per label, the same way), refitted after every validation epoch of a fit (a checkpoint keeps its epoch's; validate and test
keep the checkpoint's). The fit uses a fixed sample of training stars (``rows``, each in ``draws``
seeded noise draws; :meth:`moe.data.folder.SpectraFolder.calibration_batches`) run through the model
as it stands at the end of the epoch, such that z = (pred - true) / sigma has 68.3% within 1 and
95.4% within 2 and std 1 in every bin. The sample outnumbers the validation split several times,
so the fit is that much less noisy: per-bin factors fitted on a 5k-star validation split move each
bin's test coverage by about its own sampling error. The same stars and noise every epoch and in a
resumed run: the fit depends on the model alone. ``gamma`` (one for all bins) sets the tails of z:
a well-trained head leaves residuals lighter-tailed than a Gaussian (log g is bounded), and a scale
alone cannot then hit both coverages. The cells (quintiles of the bin's predictions, ``f_bc`` from the z's of
each) even out how the errors change across a bin's label range (at low SNR the predictions shrink toward the
label mean: a star predicted near the middle may be any star). Then one factor for all bins from the validation
split's residuals (:func:`~moe.gates.sigma_map.validation_check`), shrunk to 1 within its sampling error:
the held-out guard against experts or a head that fit the training stars better than new ones.

Last, the correlation ``rho`` of every pair of labels' z, per SNR bin as a linear function of the star's
standardised predicted labels, fitted on the same sample under the new map (:mod:`moe.gates.error_correlation`;
on the validation residuals when there is no sample): the catalogue's ``rho_<a>_<b>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from moe.data import bins
from moe.gates.error_correlation import correlation_fit, correlation_of, label_pairs
from moe.gates.metrics import LatestRows
from moe.gates.sigma_map import N_CELLS, apply_cells, apply_sigma_map, cell_scales, sigma_map, validation_check

CHUNK = 16384  # calibration rows per forward pass
HELD_OUT_ROWS = 16384  # validation residuals kept per SNR bin (the whole split when it is smaller)
Source = Callable[[int, int, torch.device], Iterable[dict]]  # (rows, draws, device) -> noisy batches


class SigmaCalibration(nn.Module):
    """The per-SNR-bin map from a star's raw spread [B, L] to its sigma [B, L] (module docstring), L labels.

    Buffers ``scale``, ``ref``, ``power`` [L, S], the cells of the standardised prediction ``cell_edges``
    [L, S, C - 1] and their factors ``cell_scale`` [L, S, C], and the error correlation's coefficients ``rho``
    [P, S, 1 + L] of the P label pairs (:mod:`~moe.gates.error_correlation`) (saved in checkpoints; the identity
    and 0 until the first fit). ``held_out`` keeps this validation epoch's (residual, spread, standardised prediction) of every
    label per bin (not saved).

    Args:
        rows: training stars in the calibration sample (0: no sample, only the validation check).
        draws: noise draws of each of those stars.
        n_labels: L.
    """

    def __init__(self, rows: int = 65_536, draws: int = 2, n_labels: int = 1, n_bins: int = bins.N_SNR_BINS):
        super().__init__()
        self.rows, self.draws = rows, draws
        self.register_buffer("scale", torch.ones(n_labels, n_bins))
        self.register_buffer("ref", torch.ones(n_labels, n_bins))
        self.register_buffer("power", torch.ones(n_labels, n_bins))
        self.register_buffer("cell_edges", torch.full((n_labels, n_bins, N_CELLS - 1), float("inf")))
        self.register_buffer("cell_scale", torch.ones(n_labels, n_bins, N_CELLS))
        self.register_buffer("rho", torch.zeros(len(label_pairs(n_labels)), n_bins, 1 + n_labels))
        self.held_out = LatestRows(HELD_OUT_ROWS, 3 * n_labels, n_bins)
        self._sample: tuple[Any, torch.Tensor] | None = None  # the sample's mixture inputs and labels, per fit

    @property
    def n_labels(self) -> int:
        return self.scale.shape[0]

    def forward(self, spread: torch.Tensor, snr_bin: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``scale * ref * (spread / ref) ** power`` of each star's SNR bin times the factor of its standardised
        prediction's cell, per label: spread, x [B, L] -> sigma [B, L]."""
        sigma = apply_sigma_map(spread, self.scale.T[snr_bin], self.ref.T[snr_bin], self.power.T[snr_bin])
        edges, scale = self.cell_edges.transpose(0, 1)[snr_bin], self.cell_scale.transpose(0, 1)[snr_bin]
        return sigma * apply_cells(x.to(edges), edges, scale).to(sigma)

    def correlation(self, snr_bin: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The error correlation of every label pair of stars in SNR bins [B] with standardised predictions x
        [B, L]: rho [B, P]."""
        return correlation_of(self.rho, snr_bin, x)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to sigma = spread and rho 0, the sample forgotten (new experts or data)."""
        for buf in (self.scale, self.ref, self.power, self.cell_scale):
            buf.fill_(1.0)
        self.cell_edges.fill_(float("inf"))
        self.rho.zero_()
        self.forget_sample()

    def forget_sample(self) -> None:
        """Drop the sample's kept inputs (rebuilt on the next fit's first refit)."""
        self._sample = None

    @torch.no_grad()
    def observe(self, residual: torch.Tensor, spread: torch.Tensor, snr_bin: torch.Tensor, x: torch.Tensor) -> None:
        """Keep validation stars' pred - true, raw spread and standardised prediction [B, L] for this epoch's
        held-out check."""
        self.held_out.update(torch.cat([residual, spread, x], -1), snr_bin)

    @torch.no_grad()
    def sample_residuals(
        self,
        source: Source | None,
        device: torch.device,
        encode: Callable[[dict], Any],
        mix: Callable[[Any], Any],
        target: Callable[[dict], torch.Tensor],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Residual pred - true [N, L], raw spread [N, L], SNR bin [N] and prediction [N, L] of the calibration stars (``source``: the
        datamodule's ``calibration_batches``; ``target``: a batch's labels [B, L]) under the model as it stands;
        empty without a source, with ``rows`` 0 or when the source yields nothing. Every rank computes the same
        rows.

        A star's mixture inputs (``encode``: a ``MixInputs`` of features, expert predictions, noise variances)
        do not change while the experts and scalers are fixed, so they are encoded once per fit and kept until it ends
        (23 + 2K + 3 numbers a row: 24 MB for the default 65,536 rows x 2 draws and K = 9 experts); each
        epoch only runs the gate and the head (``mix``: a ``MoEOutput`` with ``pred`` and ``spread``).
        """
        empty = np.zeros((0, self.n_labels)), np.zeros((0, self.n_labels)), np.zeros(0, np.int64)
        empty = (*empty, empty[0])
        if self._sample is None:
            if source is None or not self.rows:
                return empty
            parts = [(encode(batch), target(batch)) for batch in source(self.rows, self.draws, device)]
            if not parts:  # no training rows to sample (all dropped as bad, or no draws asked for)
                return empty
            self._sample = type(parts[0][0]).cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        inputs, target = self._sample
        chunks = []
        for lo in range(0, len(target), CHUNK):
            out = mix(inputs.slice(lo, lo + CHUNK))
            chunks.append(torch.cat([out.pred - target[lo : lo + CHUNK], out.spread, out.pred], -1))
        table = torch.cat(chunks).double().cpu().numpy()  # [N, 3 L]: residual, spread, prediction
        n = self.n_labels
        return table[:, :n], table[:, n : 2 * n], inputs.snr_bin.cpu().numpy().astype(np.int64), table[:, 2 * n :]

    @torch.no_grad()
    def refit(
        self,
        residual: np.ndarray,
        spread: np.ndarray,
        snr_bin: np.ndarray,
        x: np.ndarray,
        gather: Callable | None = None,
    ) -> list[float | None]:
        """For each label: fit the map on the sample's residuals [N, L] and the cells of its standardised
        predictions x [N, L], then scale it by the held-out check of this epoch's validation residuals (gathered across ranks with ``gather``, ``LightningModule.all_gather``:
        the same numbers on every rank) and store it; then the error correlations of the sample's z under the
        stored maps, against x (the validation stars' without a sample).
        Returns each label's check factor (None: no held-out rows)."""
        n_labels, n_bins = self.scale.shape
        held_out = [r.cpu().double().numpy() for r in self.held_out.rows(gather)]
        checks: list[float | None] = []
        for label in range(n_labels):
            scale, ref, power = np.ones(n_bins), np.ones(n_bins), np.ones(n_bins)
            edges, cells = np.full((n_bins, N_CELLS - 1), np.inf), np.ones((n_bins, N_CELLS))
            if len(residual):
                abs_r = np.abs(residual[:, label])
                scale, ref, gamma = sigma_map(abs_r, spread[:, label], snr_bin, n_bins)
                power[:] = gamma
                mapped = apply_sigma_map(spread[:, label], scale[snr_bin], ref[snr_bin], power[snr_bin])
                edges, cells = cell_scales(abs_r / mapped, x[:, label], snr_bin, n_bins)
            check = None
            if any(len(p) for p in held_out):  # one factor for all bins: the held-out check of the training fit
                abs_z = np.concatenate(
                    [
                        np.abs(p[:, label])
                        / apply_sigma_map(p[:, n_labels + label], scale[i], ref[i], power[i])
                        / apply_cells(p[:, 2 * n_labels + label], edges[i], cells[i])
                        for i, p in enumerate(held_out)
                    ]
                )
                check = validation_check(abs_z)
                scale = scale * check
            stored = ((self.scale, scale), (self.ref, ref), (self.power, power))
            for buf, value in (*stored, (self.cell_edges, edges), (self.cell_scale, cells)):
                buf[label].copy_(torch.as_tensor(value, dtype=buf.dtype))
            checks.append(check)
        if n_labels > 1:
            if not len(residual) and any(len(p) for p in held_out):
                residual, spread, x = (
                    np.concatenate([p[:, k * n_labels : (k + 1) * n_labels] for p in held_out]) for k in range(3)
                )
                snr_bin = np.concatenate([np.full(len(p), i) for i, p in enumerate(held_out)])
            if len(residual):
                z = residual / self._sigma(spread, snr_bin, x)
                self.rho.copy_(torch.as_tensor(correlation_fit(z, x, snr_bin, n_bins), dtype=self.rho.dtype))
        return checks

    def _sigma(self, spread: np.ndarray, snr_bin: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The stored map applied to raw spreads and standardised predictions [N, L] of SNR bins [N] (numpy)."""
        device = self.scale.device
        spread_t, x_t = (torch.as_tensor(v, dtype=torch.float64, device=device) for v in (spread, x))
        snr_bin_t = torch.as_tensor(snr_bin, dtype=torch.long, device=device)
        return self(spread_t, snr_bin_t, x_t).cpu().numpy()
