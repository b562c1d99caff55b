"""Heteroscedastic noise and the SNR, for numpy arrays and torch tensors.

``noisy = flux + noise_level * error * N(0, 1)``;
``SNR = ||flux||_2 / ||noise_level * error||_2`` (infinite when noise_level is 0).

The same noise on cached gate inputs (:mod:`moe.features.gate_inputs` says what they are): a clean
row holds its window pixels ``win`` [W] with their errors ``win_error`` [W], and its
projections ``proj`` [P] with the factor ``chol`` [P, P] of their noise covariance outside
the window; an epoch draws ``z_w`` [W] and ``u = chol @ xi`` [P].
"""

from __future__ import annotations

import numpy as np
import torch


def add_noise(
    flux: torch.Tensor, error: torch.Tensor, noise_level: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Fresh heteroscedastic Gaussian noise on the tensors' device. flux, error: [B, D]."""
    if noise_level == 0:
        return flux
    eps = torch.randn(flux.shape, dtype=flux.dtype, device=flux.device, generator=generator)
    return flux + noise_level * error * eps


def add_noise_np(flux: np.ndarray, error: np.ndarray, noise_level: float, rng: np.random.Generator) -> np.ndarray:
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


NOISE_KEYS = ("win_error", "chol")  # what a clean gate-input row holds for its noise


def draw_input_noise(
    inputs: dict[str, torch.Tensor], generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch's unit normals for a clean batch: ``z_w`` [B, W] and ``u = C xi`` [B, P]."""
    chol = inputs["chol"]
    z_w = torch.randn(inputs["win_error"].shape, dtype=chol.dtype, device=chol.device, generator=generator)
    xi = torch.randn(chol.shape[:2], dtype=chol.dtype, device=chol.device, generator=generator)
    return z_w, (chol @ xi[:, :, None]).squeeze(-1)


def add_input_noise(
    inputs: dict[str, torch.Tensor], window_weight: torch.Tensor, noise_level: float, z_w: torch.Tensor, u: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The gate inputs of ``x + s e z`` from a clean batch: ``win + s e_w z_w`` and
    ``proj + s (A_w (e_w z_w) + u)``; ``window_weight = A[:, pixels]`` [P, W]. Other keys pass through."""
    n_w = inputs["win_error"] * z_w
    out = {k: v for k, v in inputs.items() if k not in NOISE_KEYS}
    out["win"] = inputs["win"] + noise_level * n_w
    out["proj"] = inputs["proj"] + noise_level * (n_w @ window_weight.T.to(n_w.dtype) + u)
    return out


def noisy_inputs(
    inputs: dict[str, torch.Tensor],
    window_weight: torch.Tensor,
    noise_level: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Fresh noise on a clean batch of gate inputs (:func:`draw_input_noise` then :func:`add_input_noise`)."""
    if noise_level == 0:
        return {k: v for k, v in inputs.items() if k not in NOISE_KEYS}
    return add_input_noise(inputs, window_weight, noise_level, *draw_input_noise(inputs, generator))
