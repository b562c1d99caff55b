"""Physics-window features of the (noisy) flux: 13 numbers per spectrum.

For each of Ca II 8498, 8542, 8662 and the Na I 8183/8195 doublet:

- continuum: mean flux in a blue and a red side-band, interpolated linearly in wavelength
  (clamped at 0.05 so a very noisy continuum cannot blow the ratios up);
- depth = 1 - core / continuum, the core being the mean flux within +-``core_half`` A of
  the line centre (the nearest pixel when none falls inside); for Na I the mean of the
  two lines' depths;
- EW = sum over the line window of (1 - flux / continuum) * pixel width, in A.

Order: depth/EW of CaT 8498, 8542, 8662, total CaT EW, Na I depth and EW, PCA1-4 (the
projection of ``flux - pca_mean`` on the training covariance's top four axes).

Windows are stored as fixed-shape ``[L, D]`` weight buffers built from the wavelength grid
(:meth:`PhysicsFeatures.set_wave`), so the module's state has the same shape for every grid
of D pixels. The features are computed on the few hundred *window pixels* only (every
pixel some side-band, core or EW window uses; ``pixels [W]``, with the weights restricted
to them, ``[L, W]``): :meth:`PhysicsFeatures.window_features` takes ``flux[:, pixels]``,
which is what the per-row gate-input caches store (:mod:`moe.features.gate_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

PHYSICS_NAMES = (
    "CaT8498_depth",
    "CaT8498_EW",
    "CaT8542_depth",
    "CaT8542_EW",
    "CaT8662_depth",
    "CaT8662_EW",
    "CaT_EW",
    "NaI_depth",
    "NaI_EW",
    "PCA1",
    "PCA2",
    "PCA3",
    "PCA4",
)
N_PCA = 4


@dataclass(frozen=True)
class LineWindow:
    """One feature's wavelengths (air, A): line centres, EW window, continuum side-bands."""

    name: str
    centres: tuple[float, ...]
    window: tuple[float, float]
    blue: tuple[float, float]
    red: tuple[float, float]


LINES = (
    LineWindow("CaT8498", (8498.02,), (8490.0, 8506.0), (8474.0, 8484.0), (8563.0, 8577.0)),
    LineWindow("CaT8542", (8542.09,), (8530.0, 8554.0), (8474.0, 8484.0), (8563.0, 8577.0)),
    LineWindow("CaT8662", (8662.14,), (8650.0, 8674.0), (8619.0, 8642.0), (8700.0, 8725.0)),
    LineWindow("NaI", (8183.26, 8194.79), (8178.0, 8200.0), (8164.0, 8173.0), (8202.0, 8212.0)),
)


def _band_weights(wave: np.ndarray, lo: float, hi: float, what: str) -> np.ndarray:
    """Normalised averaging weights over pixels in [lo, hi]; the nearest pixel if none is inside."""
    if hi < wave[0] or lo > wave[-1]:
        raise ValueError(f"{what} [{lo}, {hi}] A lies outside the wavelength grid [{wave[0]:.1f}, {wave[-1]:.1f}] A")
    m = (wave >= lo) & (wave <= hi)
    if not m.any():
        m = np.zeros_like(m)
        m[np.argmin(np.abs(wave - 0.5 * (lo + hi)))] = True
    return m / m.sum()


class PhysicsFeatures(nn.Module):
    """flux [B, D] -> physics features [B, 13] (see module docstring). Shapes: L lines, D pixels."""

    def __init__(self, n_pixels: int, core_half: float = 0.8, min_continuum: float = 0.05):
        super().__init__()
        L, D = len(LINES), n_pixels
        self.core_half = core_half
        self.min_continuum = min_continuum
        self.register_buffer("wave", torch.zeros(D, dtype=torch.float64))
        for name in ("blue", "red", "ew_width"):
            self.register_buffer(name, torch.zeros(L, D))
        self.register_buffer("core", torch.zeros(len(LINES) + 1, D))  # Na I has two cores
        self.register_buffer("t", torch.zeros(L, D))  # continuum interpolation parameter per pixel
        self.register_buffer("pca_mean", torch.zeros(D))
        self.register_buffer("pca_components", torch.zeros(N_PCA, D))
        # the same windows restricted to the pixels they use; derived from the buffers above
        # (not saved: rebuilt after a state dict is loaded)
        self.register_buffer("pixels", torch.zeros(0, dtype=torch.long), persistent=False)
        for name in ("blue_w", "red_w", "ew_w", "t_w", "core_w"):
            self.register_buffer(name, torch.zeros(0, 0), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module._restrict_to_pixels())

    @torch.no_grad()
    def set_wave(self, wave) -> None:
        """Build the window weights for a wavelength grid [D] (Angstrom, strictly increasing)."""
        wave = np.asarray(wave, dtype=np.float64)
        if wave.shape != (self.wave.numel(),):
            raise ValueError(f"wavelength grid has shape {wave.shape}, expected ({self.wave.numel()},)")
        if not (np.all(np.isfinite(wave)) and np.all(np.diff(wave) > 0)):
            raise ValueError("wavelength grid must be finite and strictly increasing")
        width = np.gradient(wave)
        blue, red, ew, t, core = [], [], [], [], []
        for line in LINES:
            blue.append(_band_weights(wave, *line.blue, f"{line.name} blue side-band"))
            red.append(_band_weights(wave, *line.red, f"{line.name} red side-band"))
            win = (wave >= line.window[0]) & (wave <= line.window[1])
            if not win.any():
                raise ValueError(f"{line.name} window {line.window} A holds no pixel of the grid")
            ew.append(win * width)
            lb, lr = 0.5 * sum(line.blue), 0.5 * sum(line.red)
            t.append((wave - lb) / (lr - lb))
            for c in line.centres:
                core.append(_band_weights(wave, c - self.core_half, c + self.core_half, f"{line.name} core"))
        self.wave.copy_(torch.from_numpy(wave))
        for name, rows in (("blue", blue), ("red", red), ("ew_width", ew), ("t", t), ("core", core)):
            getattr(self, name).copy_(torch.from_numpy(np.stack(rows)))
        self._restrict_to_pixels()

    @torch.no_grad()
    def _restrict_to_pixels(self) -> None:
        """Derive ``pixels [W]`` and the ``[L, W]`` window weights from the ``[L, D]`` buffers."""
        used = (self.blue != 0).any(0) | (self.red != 0).any(0) | (self.core != 0).any(0) | (self.ew_width != 0).any(0)
        self.pixels = torch.nonzero(used).flatten()
        for dense, name in (
            ("blue", "blue_w"),
            ("red", "red_w"),
            ("ew_width", "ew_w"),
            ("t", "t_w"),
            ("core", "core_w"),
        ):
            setattr(self, name, getattr(self, dense)[:, self.pixels].contiguous())

    @property
    def n_window_pixels(self) -> int:
        return int(self.pixels.numel())

    @torch.no_grad()
    def set_pca(self, mean, components) -> None:
        """PCA mean [D] and components [4, D] from the training covariance."""
        self.pca_mean.copy_(torch.as_tensor(mean, dtype=self.pca_mean.dtype))
        self.pca_components.copy_(torch.as_tensor(components, dtype=self.pca_components.dtype)[:N_PCA])

    def window_features(self, win: torch.Tensor) -> torch.Tensor:
        """Depths and EWs [B, 9] from the flux at the window pixels, ``win = flux[:, pixels]`` [B, W]."""
        if self.pixels.numel() == 0:
            raise RuntimeError("PhysicsFeatures has no wavelength grid yet: call set_wave() first")
        dtype = win.dtype
        cb = win @ self.blue_w.T.to(dtype)  # [B, L]
        cr = win @ self.red_w.T.to(dtype)  # [B, L]
        cores = win @ self.core_w.T.to(dtype)  # [B, L + 1]
        t = self.t_w.to(dtype)
        cont = (cb[:, :, None] + (cr - cb)[:, :, None] * t[None]).clamp_min(self.min_continuum)  # [B, L, W]
        ew = ((1.0 - win[:, None, :] / cont) * self.ew_w.to(dtype)[None]).sum(-1)  # [B, L]
        # continuum at each core: interpolate at the core's mean position
        tc = (self.core_w.to(dtype) * torch.cat([t, t[-1:]], 0)).sum(-1)  # [L + 1]
        line_of_core = torch.tensor([0, 1, 2, 3, 3], device=win.device)
        cont_core = (cb[:, line_of_core] + (cr - cb)[:, line_of_core] * tc).clamp_min(self.min_continuum)
        depth = 1.0 - cores / cont_core  # [B, L + 1]
        na_depth = 0.5 * (depth[:, 3] + depth[:, 4])
        return torch.stack(
            [
                depth[:, 0],
                ew[:, 0],
                depth[:, 1],
                ew[:, 1],
                depth[:, 2],
                ew[:, 2],
                ew[:, :3].sum(-1),
                na_depth,
                ew[:, 3],
            ],
            dim=-1,
        )

    def pca(self, flux: torch.Tensor) -> torch.Tensor:
        """PCA1-4 [B, 4] of flux [B, D]."""
        return (flux - self.pca_mean.to(flux.dtype)) @ self.pca_components.T.to(flux.dtype)

    def forward(self, flux: torch.Tensor) -> torch.Tensor:
        """flux [B, D] -> [B, 13] (window features, then PCA1-4)."""
        return torch.cat([self.window_features(flux[:, self.pixels]), self.pca(flux)], dim=-1)
