"""The gate inputs as they were first defined: dense over all D pixels, from the noisy flux.

Kept as the test reference for the window-pixel features and the cached, per-epoch-noised
gate inputs (:mod:`moe.features.gate_inputs`), which must equal these to float tolerance.
"""

from __future__ import annotations

import torch

from moe.features import PhysicsFeatures, quality_features


def dense_physics(feats: PhysicsFeatures, flux: torch.Tensor) -> torch.Tensor:
    """flux [B, D] -> [B, 13]: windows as [L, D] weights, the continuum over every pixel."""
    dtype = flux.dtype
    cb = flux @ feats.blue.T.to(dtype)
    cr = flux @ feats.red.T.to(dtype)
    cores = flux @ feats.core.T.to(dtype)
    t = feats.t.to(dtype)
    cont = (cb[:, :, None] + (cr - cb)[:, :, None] * t[None]).clamp_min(feats.min_continuum)  # [B, L, D]
    ew = ((1.0 - flux[:, None, :] / cont) * feats.ew_width.to(dtype)[None]).sum(-1)
    tc = (feats.core.to(dtype) * torch.cat([t, t[-1:]], 0)).sum(-1)
    line_of_core = torch.tensor([0, 1, 2, 3, 3], device=flux.device)
    cont_core = (cb[:, line_of_core] + (cr - cb)[:, line_of_core] * tc).clamp_min(feats.min_continuum)
    depth = 1.0 - cores / cont_core
    na_depth = 0.5 * (depth[:, 3] + depth[:, 4])
    pca = (flux - feats.pca_mean.to(dtype)) @ feats.pca_components.T.to(dtype)
    return torch.cat(
        [
            torch.stack(
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
            ),
            pca,
        ],
        dim=-1,
    )


def reference_inputs(model, flux: torch.Tensor, error: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a ``GatedMoE`` sees for (noisy) flux [B, D] and error [B, D], computed the first way:
    raw physics [B, 13] and quality [B, 10] features, experts [B, K, L], global expert [B, L],
    unit-noise expert variances [B, K, L]."""
    return {
        "phys": dense_physics(model.physics, flux),
        "quality": quality_features(error),
        "experts": model.experts(flux),
        "global": model.global_expert(flux)[:, 0],
        "var": model.experts.predictive_variance(error, 1.0),
    }
