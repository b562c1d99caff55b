"""``RidgeExperts``: K frozen linear experts held as torch buffers.

``forward(flux [B, D]) -> [B, K]`` with the StandardScaler folded into ``weight [K, D]``
and ``bias [K]``. Buffers move with the module (GPU when there is one) and are saved in
checkpoints, but they are not parameters, so no optimiser ever touches them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class RidgeExperts(nn.Module):
    """K linear experts on the raw (noisy) flux. Shapes: B batch, D pixels, K experts."""

    def __init__(self, n_experts: int, n_pixels: int, names: Sequence[str] | None = None):
        super().__init__()
        self.register_buffer("weight", torch.zeros(n_experts, n_pixels))
        self.register_buffer("bias", torch.zeros(n_experts))
        self.names = list(names) if names is not None else [f"expert{k}" for k in range(n_experts)]
        if len(self.names) != n_experts:
            raise ValueError(f"{len(self.names)} names for {n_experts} experts")

    @classmethod
    def from_arrays(cls, weight, bias, names: Sequence[str] | None = None) -> RidgeExperts:
        weight = torch.as_tensor(weight, dtype=torch.float32)
        bias = torch.as_tensor(bias, dtype=torch.float32)
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise ValueError(f"weight must be [K, D] and bias [K], got {tuple(weight.shape)} and {tuple(bias.shape)}")
        module = cls(weight.shape[0], weight.shape[1], names)
        module.load_arrays(weight, bias)
        return module

    def load_arrays(self, weight, bias) -> None:
        """Copy new expert weights [K, D] and biases [K] into the buffers (shapes must match)."""
        weight = torch.as_tensor(weight, dtype=self.weight.dtype)
        bias = torch.as_tensor(bias, dtype=self.bias.dtype)
        if weight.shape != self.weight.shape or bias.shape != self.bias.shape:
            raise ValueError(
                f"expected weight {tuple(self.weight.shape)} and bias {tuple(self.bias.shape)}, "
                f"got {tuple(weight.shape)} and {tuple(bias.shape)}"
            )
        with torch.no_grad():
            self.weight.copy_(weight)
            self.bias.copy_(bias)

    @property
    def n_experts(self) -> int:
        return self.weight.shape[0]

    def forward(self, flux: torch.Tensor) -> torch.Tensor:
        """Expert predictions [B, K] for flux [B, D]."""
        return torch.addmm(self.bias, flux, self.weight.T)

    def predictive_variance(self, error: torch.Tensor, noise_level: float) -> torch.Tensor:
        """Var_k = noise_level^2 * sum_i (w_ki error_i)^2 -- each expert's variance under the noise. [B, K]."""
        return (noise_level**2) * (error.square() @ self.weight.square().T)

    def get_extra_state(self) -> dict:
        return {"names": list(self.names)}

    def set_extra_state(self, state: dict) -> None:
        self.names = list(state["names"])

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, n_pixels={self.weight.shape[1]}"
