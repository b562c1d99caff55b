"""Gate inputs cached per noise draw, and a compact trainer for gates on that cache.

A gate only sees the standardised features (physics 13, quality 10) and the experts'
predictions, so for comparing many gate variants those are computed once -- for training,
one fresh noise draw per epoch exactly as ``GatedMoE`` training does; for val/test the
pre-noised copies -- and every variant trains on the same tensors in seconds. Features and
experts come from a prepared :class:`~moe.gates.GatedMoE` (same code, same buffers).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moe.data.datamodule import SpectraDataModule
from moe.data.noise import add_noise
from moe.experts.bundle import ExpertBundle
from moe.experts import groups
from moe.features import quality_features
from moe.gates.fusions import build_gate
from moe.gates.metrics import gate_entropy
from moe.gates.module import GatedMoE

FAMILIES = ("global", "phys", "snr", "cells")


@dataclass
class GateData:
    """Cached gate inputs of one split (D draws x N rows for train, 1 x N for val/test)."""

    phys: torch.Tensor               # [Dr, N, 13]
    qual: torch.Tensor               # [N, 10]
    experts: dict[str, torch.Tensor]  # family -> [Dr, N, K]
    y: torch.Tensor                  # [N]
    snr: torch.Tensor                # [N]
    snr_bin: torch.Tensor            # [N]
    phys_bin: torch.Tensor           # [N]
    teff: torch.Tensor               # [N]
    mh: torch.Tensor                 # [N]

    @property
    def n_draws(self) -> int:
        return self.phys.shape[0]

    def route(self, family: str) -> torch.Tensor:
        return groups.group_of(family, self.phys_bin, self.snr_bin)


@torch.no_grad()
def build_cache(model: GatedMoE, bundle: ExpertBundle, dm: SpectraDataModule, split: str, max_rows: int,
                draws: int = 1, seed: int = 0) -> GateData:
    """Features and all families' expert predictions for up to ``max_rows`` rows of ``split``."""
    experts = {f: bundle.experts(f) for f in FAMILIES if f in bundle.families}
    batches, have = [], 0
    for b in dm.stream(split, shuffle=False, batch_size=2048):
        batches.append(b)
        have += len(b["row"])
        if have >= max_rows:
            break
    n_draws = draws if split == "train" else 1
    phys, exp = [], {f: [] for f in experts}
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_draws):
        ph, ex = [], {f: [] for f in experts}
        for b in batches:
            flux = add_noise(b["flux"], b["error"], dm.noise_level, gen) if split == "train" else b["flux"]
            ph.append(model.phys_scaler(model.physics(flux)))
            for f, m in experts.items():
                ex[f].append(m(flux))
        phys.append(torch.cat(ph)[:max_rows])
        for f in experts:
            exp[f].append(torch.cat(ex[f])[:max_rows])
    qual = torch.cat([model.qual_scaler(quality_features(b["error"])) for b in batches])[:max_rows]
    cat = lambda k, dt=None: torch.cat([b[k] for b in batches])[:max_rows].to(dt or torch.float32)  # noqa: E731
    return GateData(torch.stack(phys), qual, {f: torch.stack(v) for f, v in exp.items()}, cat("log_g"), cat("snr"),
                    cat("snr_bin", torch.long), cat("phys_bin", torch.long), cat("T_eff"), cat("M_H"))


@dataclass
class GateResult:
    pred: np.ndarray      # [N] test prediction
    weights: np.ndarray   # [N, K]
    entropy: np.ndarray   # [N]
    val_r2: float
    epochs: int
    gate: torch.nn.Module | None = None


def _predict(gate, data: GateData, family: str, fusion: str, draw: int = 0, mask: torch.Tensor | None = None):
    phys, qual = data.phys[draw], data.qual
    if mask is not None:
        phys, qual = phys * mask[:13], qual * mask[13:]
    w = gate(phys, qual, data.route(family) if fusion == "oracle" else None).weights
    return (w * data.experts[family][draw]).sum(-1), w


def r2_tensor(y: torch.Tensor, p: torch.Tensor) -> float:
    return float(1 - ((p - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def train_gate(fusion: str, family: str, train: GateData, val: GateData, test: GateData, seed: int, epochs: int = 12,
               batch_size: int = 256, lr: float = 1e-3, warmup_steps: int = 200, patience: int = 3,
               feature_mask: torch.Tensor | None = None) -> GateResult:
    """Train one gate with MSE on the cache (Adam, linear warm-up, best epoch on val R^2); test it.

    ``feature_mask`` [23] zeroes dropped (standardised) features -- their training mean -- for ablations.
    """
    torch.manual_seed(seed)
    k = train.experts[family].shape[-1]
    gate = build_gate(fusion, 13, 10, k)
    params = [p for p in gate.parameters() if p.requires_grad]
    best_state, best_r2, best_epoch, epoch = None, -math.inf, 0, 0
    if params:
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup_steps, 1)))
        gen = torch.Generator().manual_seed(seed)
        n = train.y.shape[0]
        for epoch in range(1, epochs + 1):
            d = (epoch - 1) % train.n_draws
            phys, qual, mu = train.phys[d], train.qual, train.experts[family][d]
            if feature_mask is not None:
                phys, qual = phys * feature_mask[:13], qual * feature_mask[13:]
            route = train.route(family)
            gate.train()
            for idx in torch.randperm(n, generator=gen).split(batch_size):
                w = gate(phys[idx], qual[idx], route[idx] if fusion == "oracle" else None).weights
                loss = F.mse_loss((w * mu[idx]).sum(-1), train.y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            gate.eval()
            with torch.no_grad():
                r2 = r2_tensor(val.y, _predict(gate, val, family, fusion, mask=feature_mask)[0])
            if r2 > best_r2:
                best_r2, best_state, best_epoch = r2, copy.deepcopy(gate.state_dict()), epoch
            elif epoch - best_epoch >= patience:
                break
        gate.load_state_dict(best_state)
    gate.eval()
    with torch.no_grad():
        if not params:
            best_r2 = r2_tensor(val.y, _predict(gate, val, family, fusion)[0])
        pred, w = _predict(gate, test, family, fusion, mask=feature_mask)
    return GateResult(pred.numpy(), w.numpy(), gate_entropy(w).numpy(), best_r2, best_epoch, gate)
