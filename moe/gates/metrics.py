"""Metrics of one split (torchmetrics): R^2 / MAE / RMSE, per-bin R^2, rho, gate entropy, tau.

``SplitMetrics.update(...)`` per batch, ``compute()`` once per epoch -> ``{"r2": ..., "r2_snr_H": ...}``
(un-prefixed; the module adds ``val/`` or ``test/``). R^2 of a bin with fewer than two
samples is left out rather than raising. ``rho = (R2_gate - R2_global) / (R2_oracle - R2_global)``
against the oracle routing and the global expert of the same experts and samples.

Calibration of the per-star sigma, overall and per SNR bin: ``z_std`` (std of
z = (pred - true) / sigma; 1 when calibrated), ``coverage_1sigma`` / ``coverage_2sigma``
(share of |z| <= 1 / 2; 0.683 / 0.954 for a Gaussian).

``LatestRows`` keeps the most recent rows of each SNR bin in fixed-size rings (bounded memory whatever the
split's size), gathered across DDP ranks: the validation residuals of the sigma check.

``summary_table`` prints a split's logged metrics as the text table of ``moe test`` (one per label).

With several labels the module keeps one ``SplitMetrics`` per label and logs its values with the label's
name appended (:func:`label_key`: ``r2_T_eff``, ``z_std_snr_X_M_H``); the primary label's (log g) are also
logged under the plain names (``r2``, ``z_std``, ...), which checkpoints and early stopping monitor.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanMetric, MeanSquaredError, R2Score

from moe.data import bins


def gate_entropy(weights: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Entropy in nats of each row of ``weights`` [..., K] -> [...] (clamped log)."""
    return -(weights * weights.clamp_min(eps).log()).sum(-1)


def _suffix(slice_name: str) -> str:
    """The metric-name suffix of a slice of :func:`moe.data.bins.snr_slices`: '' for all, '_snr_<bin>' for an SNR bin."""
    return "" if slice_name == "all" else f"_snr_{slice_name}"


def _r2(metric: R2Score) -> float | None:
    return float(metric.compute()) if int(metric.total) >= 2 else None


class SplitMetrics(nn.Module):
    """All epoch-level metrics of one split (state syncs across DDP ranks in ``compute``)."""

    def __init__(self, with_tau: bool = False):
        super().__init__()
        self.r2 = R2Score()
        self.mae = MeanAbsoluteError()
        self.rmse = MeanSquaredError(squared=False)
        self.r2_oracle = R2Score()
        self.r2_global = R2Score()
        self.r2_snr = nn.ModuleList(R2Score() for _ in bins.SNR_BIN_NAMES)
        self.r2_phys = nn.ModuleList(R2Score() for _ in bins.PHYS_BIN_NAMES)
        self.entropy = MeanMetric()
        self.entropy_snr = nn.ModuleList(MeanMetric() for _ in bins.SNR_BIN_NAMES)
        # z calibration: mean z, mean z^2, share |z| <= 1, share |z| <= 2; one set per slice of bins.snr_slices
        self.z_moments = nn.ModuleList(nn.ModuleList(MeanMetric() for _ in range(4)) for _ in bins.snr_slice_names())
        self.with_tau = with_tau
        if with_tau:
            self.tau_snr = nn.ModuleList(MeanMetric() for _ in bins.SNR_BIN_NAMES)

    @torch.no_grad()
    def update(
        self,
        pred: torch.Tensor,
        oracle: torch.Tensor,
        global_pred: torch.Tensor,
        target: torch.Tensor,
        entropy: torch.Tensor,
        snr_bin: torch.Tensor,
        phys_bin: torch.Tensor,
        tau: torch.Tensor | None = None,
        sigma: torch.Tensor | None = None,
    ) -> None:
        pred, oracle, global_pred, target = (t.float() for t in (pred, oracle, global_pred, target))
        if sigma is not None:
            z = (pred - target) / sigma.float().clamp_min(1e-12)
            stats = (z, z.square(), (z.abs() <= 1).float(), (z.abs() <= 2).float())
            for moments, (_, sel) in zip(self.z_moments, bins.snr_slices(snr_bin)):
                if sel.any():
                    for m, v in zip(moments, stats):
                        m.update(v[sel])
        self.r2.update(pred, target)
        self.mae.update(pred, target)
        self.rmse.update(pred, target)
        self.r2_oracle.update(oracle, target)
        self.r2_global.update(global_pred, target)
        self.entropy.update(entropy)
        for i, (m_r2, m_h) in enumerate(zip(self.r2_snr, self.entropy_snr)):
            sel = snr_bin == i
            if sel.any():
                m_r2.update(pred[sel], target[sel])
                m_h.update(entropy[sel])
                if self.with_tau and tau is not None:
                    self.tau_snr[i].update(tau[sel])
        for k, m in enumerate(self.r2_phys):
            sel = phys_bin == k
            if sel.any():
                m.update(pred[sel], target[sel])

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        r2, r2_o, r2_g = _r2(self.r2), _r2(self.r2_oracle), _r2(self.r2_global)
        if r2 is None:
            return out
        out |= {
            "r2": r2,
            "r2_oracle": r2_o,
            "r2_global": r2_g,
            "mae": float(self.mae.compute()),
            "rmse": float(self.rmse.compute()),
        }
        denom = r2_o - r2_g
        out["rho"] = (r2 - r2_g) / denom if abs(denom) > 1e-9 else math.nan
        out["entropy"] = float(self.entropy.compute())
        for name, m_r2, m_h in zip(bins.SNR_BIN_NAMES, self.r2_snr, self.entropy_snr):
            v = _r2(m_r2)
            if v is not None:
                out[f"r2_snr_{name}"] = v
            if int(m_r2.total) > 0:
                out[f"entropy_snr_{name}"] = float(m_h.compute())
        for k, m in enumerate(self.r2_phys):
            v = _r2(m)
            if v is not None:
                out[f"r2_phys_{k}"] = v
        for name, (mean_z, mean_z2, cov1, cov2) in zip(bins.snr_slice_names(), self.z_moments):
            suffix = _suffix(name)
            if float(mean_z.weight) > 0:
                mz = float(mean_z.compute())
                out[f"z_std{suffix}"] = math.sqrt(max(float(mean_z2.compute()) - mz * mz, 0.0))
                out[f"coverage_1sigma{suffix}"] = float(cov1.compute())
                out[f"coverage_2sigma{suffix}"] = float(cov2.compute())
        if self.with_tau:
            for name, m in zip(bins.SNR_BIN_NAMES, self.tau_snr):
                if float(m.weight) > 0:
                    out[f"tau_snr_{name}"] = float(m.compute())
        return out

    def reset(self) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset"):
                m.reset()


class LatestRows(nn.Module):
    """The latest ``capacity`` rows (``width`` floats) of each of S SNR bins, in rings [S, capacity, width].

    Not saved in checkpoints (non-persistent buffers); ``rows(gather)`` returns each bin's rows [n, width]
    (in ring order), with ``gather`` (``LightningModule.all_gather``) collecting every rank's rings first.
    """

    def __init__(self, capacity: int, width: int, n_bins: int = bins.N_SNR_BINS):
        super().__init__()
        self.capacity = capacity
        self.register_buffer("ring", torch.full((n_bins, capacity, width), float("nan")), persistent=False)
        self.register_buffer("seen", torch.zeros(n_bins, dtype=torch.long), persistent=False)

    @torch.no_grad()
    def update(self, rows: torch.Tensor, snr_bin: torch.Tensor) -> None:
        """Append rows [B, width] (rows with a non-finite value are skipped) to their bins' rings."""
        keep = torch.isfinite(rows).all(-1)
        for i in range(self.ring.shape[0]):
            new = rows[keep & (snr_bin == i)][-self.capacity :].to(self.ring.dtype)
            if len(new):
                slots = (self.seen[i] + torch.arange(len(new), device=new.device)) % self.capacity
                self.ring[i, slots] = new
                self.seen[i] += len(new)

    def rows(self, gather=None) -> list[torch.Tensor]:
        ring = gather(self.ring) if gather is not None else self.ring
        ring = ring.reshape(-1, *self.ring.shape).transpose(0, 1).flatten(1, 2)  # [S, ranks * capacity, width]
        return [r[torch.isfinite(r[:, 0])] for r in ring]

    def reset(self) -> None:
        self.ring.fill_(float("nan"))
        self.seen.zero_()


def label_key(key: str, label: str | None) -> str:
    """The logged name of metric ``key`` of ``label``: ``r2`` -> ``r2_T_eff`` (``label`` None: ``key``)."""
    return key if label is None else f"{key}_{label}"


def summary_table(metrics: dict[str, float], prefix: str = "test", label: str | None = None) -> str:
    """A text table from logged metrics: overall and per-SNR-bin R^2, mean gate entropy, the calibration
    of sigma (z std, share of |z| <= 1 and <= 2) and tau; then rho, the oracle and global R^2, MAE, RMSE.
    ``label``: that label's metrics (names ending in ``_<label>``; None: the plain names)."""

    def get(key):
        v = metrics.get(f"{prefix}/{label_key(key, label)}")
        return float(v) if v is not None else float("nan")

    def row(label_: str, suffix: str) -> str:
        end = label_key(suffix, label)
        if suffix and not any(k.startswith(f"{prefix}/") and k.endswith(end) for k in metrics):
            return f"{label_:<8}{'no spectra in this bin':>25}"  # e.g. SNR X at a low noise level
        tau = get(f"tau{suffix}") if suffix else float("nan")
        return (
            f"{label_:<8}{get(f'r2{suffix}'):>9.4f}{get(f'entropy{suffix}'):>10.3f}{get(f'z_std{suffix}'):>8.2f}"
            f"{get(f'coverage_1sigma{suffix}'):>9.1%}{get(f'coverage_2sigma{suffix}'):>9.1%}"
            f"{(f'{tau:>8.2f}' if math.isfinite(tau) else ''):>8}"
        )

    lines = [f"{'slice':<8}{'R2':>9}{'entropy':>10}{'z std':>8}{'|z|<=1':>9}{'|z|<=2':>9}{'tau':>8}"]
    lines += [
        row(name if name == "all" else f"SNR {name}", _suffix(name)) for name in bins.snr_slice_names(high_first=True)
    ]
    lines.append(
        f"rho = {get('rho'):.3f}   (R2 oracle {get('r2_oracle'):.4f}, R2 global {get('r2_global'):.4f}, "
        f"MAE {get('mae'):.4f}, RMSE {get('rmse'):.4f})"
    )
    return "\n".join(lines)
