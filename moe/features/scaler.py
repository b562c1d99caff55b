"""Standardisation of feature vectors with training statistics, as a module with buffers."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class Standardizer(nn.Module):
    """``(x - mean) / std`` with buffers ``mean [F]``, ``std [F]`` (fitted on training data)."""

    def __init__(self, n_features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor]) -> Standardizer:
        """Population mean/std over all rows of ``batches`` ([b, F] each), accumulated in float64."""
        n, s, ss = 0, 0.0, 0.0
        for x in batches:
            x = x.double()
            n += x.shape[0]
            s = s + x.sum(0)
            ss = ss + x.square().sum(0)
        if n < 2:
            raise ValueError(f"need at least 2 rows to fit a Standardizer, got {n}")
        mean = s / n
        std = (ss / n - mean.square()).clamp_min(0).sqrt()
        std = torch.where(std > 1e-12 * mean.abs().clamp_min(1.0), std, torch.ones_like(std))
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(std.to(self.std.dtype))
        return self
