"""Heteroscedastic noise and the SNR of DESIGN §4, for numpy arrays and torch tensors.

``noisy = flux + noise_level * error * N(0, 1)``;
``SNR = ||flux||_2 / ||noise_level * error||_2`` (infinite when noise_level is 0).
"""

from __future__ import annotations

import numpy as np
import torch


def add_noise(flux: torch.Tensor, error: torch.Tensor, noise_level: float,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Fresh heteroscedastic Gaussian noise on the tensors' device. flux, error: [B, D]."""
    if noise_level == 0:
        return flux
    eps = torch.randn(flux.shape, dtype=flux.dtype, device=flux.device, generator=generator)
    return flux + noise_level * error * eps


def add_noise_np(flux: np.ndarray, error: np.ndarray, noise_level: float,
                 rng: np.random.Generator) -> np.ndarray:
    """numpy twin of :func:`add_noise` (float32 out), for caches and the experts' pass."""
    if noise_level == 0:
        return flux.astype(np.float32, copy=True)
    eps = rng.standard_normal(flux.shape, dtype=np.float32)
    return (flux + np.float32(noise_level) * error * eps).astype(np.float32, copy=False)


def snr(flux: np.ndarray, error: np.ndarray, noise_level: float) -> np.ndarray:
    """Per-spectrum SNR ``||flux|| / ||noise_level * error||``. flux, error: [N, D] -> [N]."""
    # row dot products accumulated in float64 straight from the float32 rows (no float64 copies)
    num = np.sqrt(np.einsum("...i,...i->...", flux, flux, dtype=np.float64))
    den = float(noise_level) * np.sqrt(np.einsum("...i,...i->...", error, error, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.inf)
