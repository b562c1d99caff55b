"""Gate inputs: what a gate reads about a spectrum, split into a per-row part and a per-epoch noise.

A gate over K linear experts reads, for the noisy flux ``x + n`` with
``n = s * e * z`` (s the noise level, e the 1-sigma error, z ~ N(0, I_D)):

- ``proj = A (x + n) + b`` [P]: the K experts and the global expert for each of the L labels and
  PCA1-4 -- rows of one affine map ``A [P, D], b [P]`` (P = K L + L + 4; expert k's label l is row
  ``k L + l``, the global expert's label l row ``K L + l``, PCA the last four);
- ``win = (x + n)[pixels]`` [W]: the few hundred window pixels the CaT / Na I depths and
  EWs are made of (:class:`moe.features.PhysicsFeatures`);
- ``quality`` [10] and ``var = e^2 A^2`` [P] (each row's variance under unit noise): functions
  of the error alone.

Everything but the noise is fixed per row, so it is computed once (:func:`row_inputs`) and
cached next to the data. The noise needs no D-pixel draw either: with ``w`` the window
pixels and ``r`` the rest, ``A n = A_w n_w + A_r n_r``, and ``A_r n_r`` is Gaussian with
covariance ``s^2 A_r diag(e_r^2) A_r^T = s^2 C C^T`` independent of ``n_w``. A row therefore
caches its window errors ``win_error = e_w`` [W] and the factor ``chol = C`` [P, P], and an
epoch draws ``z_w`` [W] and ``xi`` [P] (:func:`moe.data.noise.draw_input_noise`) -- W + P
normals instead of D -- for the same joint distribution of every gate input as the
full-spectrum draw (:func:`moe.data.noise.add_input_noise` with ``u = C xi``; with
``u = A_r (e_r z_r)`` it reproduces that draw exactly, which is how the tests check it).

Batches are dicts of tensors; B rows, D pixels, W window pixels, P projections.
"""

from __future__ import annotations

import torch

from moe.data.noise import NOISE_KEYS, noisy_inputs
from moe.features.quality import quality_features

__all__ = [
    "INPUT_KEYS",
    "NOISE_KEYS",
    "gate_features",
    "noisy_inputs",
    "projection_map",
    "rest_covariance_weights",
    "row_inputs",
]

INPUT_KEYS = ("proj", "win", "quality", "var")  # what every gate-input row holds


def rest_covariance_weights(weight: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """``[D, T]`` products ``A[p, i] A[q, i]`` for the T = P (P + 1) / 2 pairs p >= q, zero at the
    window pixels: ``e^2 @ it`` is the lower triangle of ``A_r diag(e_r^2) A_r^T`` (one GEMM)."""
    p, q = torch.tril_indices(weight.shape[0], weight.shape[0], device=weight.device)
    outer = weight.T[:, p] * weight.T[:, q]
    outer[pixels] = 0
    return outer


def _symmetric(tril: torch.Tensor, size: int) -> torch.Tensor:
    """[B, T] lower triangles (row-major, as ``tril_indices``) -> [B, P, P] symmetric matrices."""
    p, q = torch.tril_indices(size, size, device=tril.device)
    out = tril.new_zeros(tril.shape[0], size, size)
    out[:, p, q] = tril
    out[:, q, p] = tril
    return out


def _square_root(cov: torch.Tensor) -> torch.Tensor:
    """A factor C with C C^T = cov for a batch [B, P, P] of PSD matrices (Cholesky; eigh where it fails)."""
    chol, info = torch.linalg.cholesky_ex(cov)
    bad = info != 0
    if bad.any():
        vals, vecs = torch.linalg.eigh(cov[bad])
        chol[bad] = vecs * vals.clamp_min(0).sqrt()[:, None, :]
    return chol


@torch.no_grad()
def row_inputs(
    flux: torch.Tensor,
    error: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pixels: torch.Tensor,
    noise_factor: bool = False,
    rest_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Gate inputs of flux [B, D] with error [B, D] for the map ``weight [P, D], bias [P]`` and
    window ``pixels [W]``: proj [B, P], win [B, W], quality [B, 10], var [B, P] (float32).

    With ``noise_factor`` (clean training rows) also ``win_error`` [B, W] and ``chol`` [B, P, P];
    ``rest_weights`` (from :func:`rest_covariance_weights`) may be passed to reuse it across blocks.
    """
    flux, error = flux.float(), error.float()
    w32 = weight.float()
    out = {
        "proj": torch.addmm(bias.float(), flux, w32.T),
        "win": flux[:, pixels].contiguous(),
        "quality": quality_features(error),
        "var": error.square() @ w32.square().T,
    }
    if noise_factor:
        p = weight.shape[0]
        outer = rest_weights if rest_weights is not None else rest_covariance_weights(weight.double(), pixels)
        cov = _symmetric(error.double().square() @ outer, p)
        out["win_error"] = error[:, pixels].contiguous()
        out["chol"] = _square_root(cov).float()
    return out


def projection_map(experts, global_expert, physics) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map ``weight [P, D], bias [P]`` of a gate's linear inputs: rows are the K experts' L labels
    (expert-major), the global expert's L labels and PCA1-4 (P = K L + L + 4); ``experts`` / ``global_expert``
    are :class:`~moe.experts.RidgeExperts` of the same labels, ``physics`` a
    :class:`~moe.features.PhysicsFeatures` with its PCA basis set. With one label it is today's map (P = K + 5)."""
    comps = physics.pca_components
    pca_bias = -(comps.double() @ physics.pca_mean.double()).to(comps.dtype)
    (w_e, b_e), (w_g, b_g) = experts.rows(), global_expert.rows()
    return torch.cat([w_e, w_g, comps]), torch.cat([b_e, b_g, pca_bias])


def gate_features(physics, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Physics [B, 13] (window depths/EWs, PCA1-4: the last projections) and quality [B, 10] features of noisy
    gate inputs, before standardisation."""
    n_pca = physics.pca_components.shape[0]
    phys = torch.cat([physics.window_features(inputs["win"]), inputs["proj"][:, -n_pca:]], dim=-1)
    return phys, inputs["quality"]
