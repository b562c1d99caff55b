"""The 10 aggregate statistics of the error vector, in torch (twin of ``moe.data.error_stats``).

mean, std (population), min, max, median, sum, q25, q75 (linear interpolation, as numpy),
skew (population, scipy's ``bias=True``) and excess kurtosis (scipy's default). Computed in
float64 on the input's device; equal to numpy/scipy within 1e-5 relative. A constant row
has skew and kurtosis 0 (scipy would give NaN). The quantiles come from the rows' order statistics at the ranks
they interpolate (a partial sort on the CPU), not from a full sort.
"""

from __future__ import annotations

import numpy as np
import torch

from moe.data.error_stats import QUALITY_NAMES

__all__ = ["QUALITY_NAMES", "quality_features"]


# rows per piece on the CPU: the float64 temporaries of 64 rows x 4096 pixels stay in L2 (the same arithmetic on
# all rows at once runs at memory speed); identical values, each row's reductions do not depend on the others
CPU_ROWS = 64
QUANTILES = (0.5, 0.25, 0.75)


def _interpolation(n: int, q: float) -> tuple[int, int, float]:
    """Ranks and weight of numpy's linear-interpolation quantile ``q`` of ``n`` values: ``lo``, ``hi``, ``frac``."""
    pos = q * (n - 1)
    lo = int(pos)
    return lo, min(lo + 1, n - 1), pos - lo


def _order_statistics(error: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """error [B, D] -> each row's values of the given ranks in ascending order [B, len(ranks)] (exact).

    On the CPU one partial sort per row (``np.partition`` at all the ranks at once: a quarter of the time of
    sorting 4096 values); elsewhere a sort."""
    if error.device.type == "cpu" and error.dtype in (torch.float32, torch.float64):
        part = np.partition(error.detach().numpy(), ranks, axis=-1)
        return torch.from_numpy(np.ascontiguousarray(part[:, ranks]))
    return error.sort(dim=-1).values[:, ranks]


def _statistics(error: torch.Tensor) -> torch.Tensor:
    """:func:`quality_features` of one piece of rows, in float64."""
    n = error.shape[-1]
    where = [_interpolation(n, q) for q in QUANTILES]
    ranks = sorted({0, n - 1, *(r for lo, hi, _ in where for r in (lo, hi))})
    s = _order_statistics(error, ranks).double()  # the input's dtype gives the same values, converted after
    at = {r: s[:, i] for i, r in enumerate(ranks)}
    median, q25, q75 = (at[lo] * (1 - frac) + at[hi] * frac for lo, hi, frac in where)
    e = error.double()
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
    return torch.stack([mean, m2.sqrt(), at[0], at[n - 1], median, e.sum(-1), q25, q75, skew, kurt], dim=-1)


def quality_features(error: torch.Tensor) -> torch.Tensor:
    """error [B, D] -> statistics [B, 10] (dtype of ``error``), in the order of ``QUALITY_NAMES``."""
    if error.device.type != "cpu" or len(error) <= CPU_ROWS:
        return _statistics(error).to(error.dtype)
    return torch.cat([_statistics(piece) for piece in error.split(CPU_ROWS)]).to(error.dtype)
