"""``RidgeExperts``: K frozen linear experts for L labels, held as torch buffers.

``forward(flux [B, D]) -> [B, K, L]`` with the StandardScaler folded into ``weight [K, L, D]``
and ``bias [K, L]``: expert k's prediction of label l (``labels[l]``, a parameter-table column).
Buffers move with the module (GPU when there is one) and are saved in checkpoints, but they are
not parameters, so no optimiser ever touches them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

DEFAULT_LABELS = ("log_g",)  # what a [K, D] weight (one label) predicts


class RidgeExperts(nn.Module):
    """K linear experts of L labels on the raw (noisy) flux. Shapes: B batch, D pixels, K experts, L labels."""

    def __init__(
        self,
        n_experts: int,
        n_pixels: int,
        names: Sequence[str] | None = None,
        labels: Sequence[str] = DEFAULT_LABELS,
    ):
        super().__init__()
        self.labels = tuple(labels)
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct and at least one, got {self.labels}")
        self.register_buffer("weight", torch.zeros(n_experts, len(self.labels), n_pixels))
        self.register_buffer("bias", torch.zeros(n_experts, len(self.labels)))
        self.names = list(names) if names is not None else [f"expert{k}" for k in range(n_experts)]
        if len(self.names) != n_experts:
            raise ValueError(f"{len(self.names)} names for {n_experts} experts")

    @classmethod
    def from_arrays(cls, weight, bias, names: Sequence[str] | None = None, labels: Sequence[str] | None = None):
        """Experts from ``weight [K, L, D], bias [K, L]`` (``labels`` names the L labels) or, one label,
        ``weight [K, D], bias [K]`` (``labels`` default ``("log_g",)``)."""
        weight = torch.as_tensor(weight, dtype=torch.float32)
        bias = torch.as_tensor(bias, dtype=torch.float32)
        if weight.ndim == 2 and bias.ndim == 1:
            weight, bias = weight[:, None], bias[:, None]
        if weight.ndim != 3 or bias.shape != weight.shape[:2]:
            raise ValueError(
                f"weight must be [K, L, D] and bias [K, L] (or [K, D] and [K]), "
                f"got {tuple(weight.shape)} and {tuple(bias.shape)}"
            )
        labels = tuple(labels) if labels is not None else DEFAULT_LABELS
        if len(labels) != weight.shape[1]:
            raise ValueError(f"{len(labels)} label names {labels} for weights of {weight.shape[1]} labels")
        module = cls(weight.shape[0], weight.shape[2], names, labels)
        module.load_arrays(weight, bias)
        return module

    def load_arrays(self, weight, bias) -> None:
        """Copy new expert weights [K, L, D] and biases [K, L] into the buffers (shapes must match)."""
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

    @property
    def n_labels(self) -> int:
        return self.weight.shape[1]

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts as K * L rows of one affine map, expert-major (row k * L + l): ``[K L, D], [K L]``."""
        return self.weight.reshape(-1, self.weight.shape[-1]), self.bias.reshape(-1)

    def forward(self, flux: torch.Tensor) -> torch.Tensor:
        """Expert predictions [B, K, L] for flux [B, D]."""
        w, b = self.rows()
        return torch.addmm(b, flux, w.T).view(flux.shape[0], *self.bias.shape)

    def predictive_variance(self, error: torch.Tensor, noise_level: float) -> torch.Tensor:
        """Var_kl = noise_level^2 * sum_i (w_kli error_i)^2 -- each expert's variance under the noise. [B, K, L]."""
        w, _ = self.rows()
        return ((noise_level**2) * (error.square() @ w.square().T)).view(error.shape[0], *self.bias.shape)

    def get_extra_state(self) -> dict:
        return {"names": list(self.names), "labels": list(self.labels)}

    def set_extra_state(self, state: dict) -> None:
        self.names = list(state["names"])
        self.labels = tuple(state.get("labels", DEFAULT_LABELS))  # saved before the label axis: log g

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, labels={list(self.labels)}, n_pixels={self.weight.shape[2]}"
