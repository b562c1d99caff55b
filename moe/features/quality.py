"""The 10 aggregate statistics of the error vector, in torch (twin of ``moe.data.error_stats``).

mean, std (population), min, max, median, sum, q25, q75 (linear interpolation, as numpy),
skew (population, scipy's ``bias=True``) and excess kurtosis (scipy's default). Computed in
float64 on the input's device; equal to numpy/scipy within 1e-5 relative. A constant row
has skew and kurtosis 0 (scipy would give NaN).
"""

from __future__ import annotations

import torch

from moe.data.error_stats import QUALITY_NAMES

__all__ = ["QUALITY_NAMES", "quality_features"]


def _quantile_sorted(s: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation quantile of rows already sorted along the last axis."""
    pos = q * (s.shape[-1] - 1)
    lo = int(pos)
    hi = min(lo + 1, s.shape[-1] - 1)
    frac = pos - lo
    return s[..., lo] * (1 - frac) + s[..., hi] * frac


def quality_features(error: torch.Tensor) -> torch.Tensor:
    """error [B, D] -> statistics [B, 10] (dtype of ``error``), in the order of ``QUALITY_NAMES``."""
    e = error.double()
    s = error.sort(dim=-1).values.double()  # sorting the input's dtype gives the same order and values
    mean = e.mean(-1)
    c = e - mean[:, None]
    c2 = c.square()
    m2 = c2.mean(-1)
    m3 = (c2 * c).mean(-1)
    m4 = c2.square().mean(-1)
    ok = m2 > torch.finfo(torch.float64).tiny
    safe = torch.where(ok, m2, torch.ones_like(m2))
    skew = torch.where(ok, m3 / safe.pow(1.5), torch.zeros_like(m2))
    kurt = torch.where(ok, m4 / safe.square() - 3.0, torch.zeros_like(m2))
    out = torch.stack(
        [
            mean,
            m2.sqrt(),
            s[:, 0],
            s[:, -1],
            _quantile_sorted(s, 0.5),
            e.sum(-1),
            _quantile_sorted(s, 0.25),
            _quantile_sorted(s, 0.75),
            skew,
            kurt,
        ],
        dim=-1,
    )
    return out.to(error.dtype)
