"""Non-linear per-bin experts for the ceiling sweep: LightGBM and a small 1D-CNN.

Both take numpy arrays ``[N, D]`` and predict log g ``[N]``; neither is frozen into the
gate module (they serve the Oracle-Hybrid study of MOE-CEILING-C1-01). :func:`fit_lgbm` is
the one LightGBM builder of the project; the leakage audit calls it with its own parameters.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

# feature_fraction 0.3 is colsample_bytree, bagging 0.7 every iteration is subsample / subsample_freq
LGBM_PARAMS = {
    "n_estimators": 500,
    "max_depth": 5,
    "learning_rate": 0.05,
    "num_leaves": 20,
    "colsample_bytree": 0.3,
    "subsample": 0.7,
    "subsample_freq": 1,
    "min_child_samples": 50,
    "reg_alpha": 1.0,
    "reg_lambda": 1.0,
}


def fit_lgbm(
    x: np.ndarray, y: np.ndarray, seed: int = 0, device_type: str = "cpu", params: dict | None = None, **options
):
    """A fitted ``lightgbm.LGBMRegressor``: ``params`` (default :data:`LGBM_PARAMS`) plus ``options``
    (e.g. ``importance_type``), seeded, on ``device_type`` (cpu, gpu, cuda), 2 threads."""
    import lightgbm as lgb

    model = lgb.LGBMRegressor(
        **(LGBM_PARAMS if params is None else params),
        **options,
        random_state=seed,
        n_jobs=2,
        verbose=-1,
        device_type=device_type,
    )
    return model.fit(x, y)


class SpectrumCNN(nn.Module):
    """Conv1d(1->32->64->32, kernel 5, ReLU, max-pool 4 each) -> FC 64 -> 1. Input [B, D] -> [B]."""

    def __init__(
        self, n_pixels: int, channels: tuple[int, ...] = (32, 64, 32), kernel: int = 5, pool: int = 4, fc: int = 64
    ):
        super().__init__()
        layers, c_in, length = [], 1, n_pixels
        for c in channels:
            layers += [nn.Conv1d(c_in, c, kernel, padding=kernel // 2), nn.ReLU(), nn.MaxPool1d(pool)]
            c_in, length = c, length // pool
        if length < 1:
            raise ValueError(f"{n_pixels} pixels are too few for {len(channels)} pooling stages of {pool}")
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_in * length, fc), nn.ReLU(), nn.Linear(fc, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x[:, None, :])).squeeze(-1)


@dataclass
class CNNExpert:
    """Trains :class:`SpectrumCNN` with fresh noise every epoch and keeps the best validation epoch.

    Inputs are standardised per pixel with training statistics; the target by its mean/std.
    ``patience`` stops when validation MSE has not improved for that many epochs.
    """

    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-3
    patience: int = 5
    noise_level: float = 1.0
    device: str = "cpu"
    history: list[float] = field(default_factory=list)

    def fit(
        self, clean: np.ndarray, error: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, seed: int = 0
    ) -> CNNExpert:
        torch.manual_seed(seed)
        dev = torch.device(self.device)
        clean_t, err_t = torch.from_numpy(clean).float(), torch.from_numpy(error).float()
        self.mu = clean_t.mean(0)
        self.sd = torch.sqrt(clean_t.var(0) + self.noise_level**2 * err_t.square().mean(0)).clamp_min(1e-6)
        self.y_mu, self.y_sd = float(y.mean()), float(y.std() or 1.0)
        yt = (torch.from_numpy(y).float() - self.y_mu) / self.y_sd
        self.model = SpectrumCNN(clean.shape[1]).to(dev)
        opt = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(seed)
        best, best_state, since = math.inf, None, 0
        for _ in range(self.epochs):
            self.model.train()
            for idx in torch.randperm(len(yt), generator=gen).split(self.batch_size):
                x = clean_t[idx] + self.noise_level * err_t[idx] * torch.randn(len(idx), clean.shape[1], generator=gen)
                loss = nn.functional.mse_loss(self.model(((x - self.mu) / self.sd).to(dev)), yt[idx].to(dev))
                opt.zero_grad()
                loss.backward()
                opt.step()
            val = float(np.mean((self.predict(x_val) - y_val) ** 2))
            self.history.append(val)
            if val < best:
                best, best_state, since = val, copy.deepcopy(self.model.state_dict()), 0
            else:
                since += 1
                if since >= self.patience:
                    break
        self.model.load_state_dict(best_state)
        return self

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        """x [N, D] -> [N], ``batch_size`` rows at a time: the first layer's output alone is 0.5 MB a row (32
        channels x 4096 pixels), so the rows per pass, not N, set the memory (1350 rows a pass took 2.1 GB)."""
        self.model.eval()
        dev = next(self.model.parameters()).device
        out = [
            self.model(((torch.from_numpy(x[i : i + self.batch_size]).float() - self.mu) / self.sd).to(dev)).cpu()
            for i in range(0, len(x), self.batch_size)
        ]
        return (torch.cat(out).numpy() * self.y_sd + self.y_mu).astype(np.float64)
