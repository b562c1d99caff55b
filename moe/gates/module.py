"""``GatedMoE``: frozen Ridge experts, feature towers and a fusion gate, trained with MSE.

``log g = sum_k w_k(phys, qual) * expert_k(noisy flux)``; loss ``MSE(log g, truth)`` (+ an
optional entropy term). Also returns sigma, the mixture's predictive spread
``sqrt(sum_k w_k (v_k + mu_k^2) - mu^2)`` with ``v_k`` each expert's variance under the noise.

The module owns loss, metrics, optimiser and logging; the experts (:mod:`moe.experts`),
features (:mod:`moe.features`) and gates (:mod:`moe.gates.fusions`) are plain modules.
On first use, ``setup`` loads or fits the experts for the datamodule's data (cached under
the data folder), fills the feature windows and PCA basis, caches every row's gate inputs
(:mod:`moe.prepare`; the datamodule then streams those) and fits the feature
standardisation on noisy training rows. All of that lives in buffers, so a checkpoint
carries it; a checkpoint made on other data is refused when loaded.

A batch is either spectra (``flux``, ``error``: the gate inputs are computed from them) or
cached gate inputs (``proj``, ``win``, ``quality``, ``var``; :mod:`moe.features.inputs`),
already noisy: both give the same numbers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import OptimizerCallable
from pytorch_lightning.loggers import TensorBoardLogger

from moe.data import bins
from moe.experts import groups
from moe.experts.bundle import ExpertsMismatchError, bundle_key, load_or_fit
from moe.experts.fit import FitConfig
from moe.experts.module import RidgeExperts
from moe.experts.ridge import DEFAULT_ALPHAS
from moe.features import PHYSICS_NAMES, QUALITY_NAMES, PhysicsFeatures, Standardizer
from moe.features.inputs import NOISE_KEYS, row_inputs
from moe.gates.fusions import FUSIONS, ProductGate, build_gate
from moe.gates.metrics import SplitMetrics, gate_entropy
from moe.prepare import SPLITS, ensure_inputs

log = logging.getLogger(__name__)
MAX_FIGURE_SAMPLES = 20_000


class MoEOutput(NamedTuple):
    """Everything one forward pass produces (B batch, K experts)."""

    pred: torch.Tensor          # [B] log g
    sigma: torch.Tensor         # [B] mixture predictive spread
    weights: torch.Tensor       # [B, K]
    expert_preds: torch.Tensor  # [B, K]
    entropy: torch.Tensor       # [B] nats
    tau: torch.Tensor | None    # [B] (temperature gate)
    global_pred: torch.Tensor   # [B] the global expert (the baseline of rho)


def default_family(fusion: str) -> str:
    """The expert family a fusion gates over unless ``experts`` says otherwise."""
    return {"quality_only": "snr", "global": "global"}.get(fusion, "phys")


class GatedMoE(pl.LightningModule):
    """A gate over frozen Ridge experts (see module docstring).

    Args:
        fusion: concat | logit_add | product | temperature | phys_only | quality_only | oracle | global.
        experts: expert family gated over (phys: 9, snr: 4, cells: 36, global: 1); default by fusion.
        n_pixels: spectrum length D (linked from the datamodule).
        noise_level: noise multiplier of the data (linked; used for the predictive spread).
        experts_dir: where expert files are cached (linked: ``<data_dir>/experts``).
        experts_path: an explicit experts file (must match the data; overrides the cache).
        expert_noise_mode / expert_alphas / expert_min_samples / expert_fallback: how experts are fitted.
        feature_rows: training rows used to fit the feature standardisation.
        entropy_weight: coefficient of the mean gate entropy added to the loss (0: pure MSE).
        warmup_steps: linear learning-rate warm-up length.
        optimizer: optimiser factory (Adam by default).
    """

    monitor = "val/r2"
    mode = "max"

    def __init__(self, fusion: str = "concat", experts: str | None = None, n_pixels: int = 4096,
                 noise_level: float = 1.0, experts_dir: str | None = None, experts_path: str | None = None,
                 expert_noise_mode: str = "marginal", expert_alphas: list[float] | None = None,
                 expert_min_samples: int = 50, expert_fallback: str | None = None, feature_rows: int = 20_000,
                 entropy_weight: float = 0.0, warmup_steps: int = 200,
                 optimizer: OptimizerCallable = torch.optim.Adam):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose from {FUSIONS}")
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.family = experts or default_family(fusion)
        if self.family not in groups.FAMILIES:
            raise ValueError(f"unknown expert family {self.family!r}; choose from {groups.FAMILIES}")
        if fusion == "global" and self.family != "global":
            raise ValueError("fusion 'global' uses the global expert: leave experts unset or set it to 'global'")
        k = groups.FAMILY_SIZES[self.family]
        self.experts = RidgeExperts(k, n_pixels, groups.group_names(self.family))
        self.global_expert = RidgeExperts(1, n_pixels, ["global"])
        self.physics = PhysicsFeatures(n_pixels)
        self.phys_scaler = Standardizer(len(PHYSICS_NAMES))
        self.qual_scaler = Standardizer(len(QUALITY_NAMES))
        self.gate = build_gate(fusion, len(PHYSICS_NAMES), len(QUALITY_NAMES), k)
        self.register_buffer("prepared", torch.tensor(False))
        self.val_metrics = SplitMetrics(with_tau=fusion == "temperature")
        self.test_metrics = SplitMetrics(with_tau=fusion == "temperature")
        self.data_fingerprint: str | None = None
        self.defer_to_checkpoint = False  # set by the CLI when a checkpoint will fill the buffers
        self._fig_buffer: list[dict[str, torch.Tensor]] = []

    # ---- preparation ------------------------------------------------------------------
    def fit_config(self) -> FitConfig:
        h = self.hparams
        fams = ("global", "phys", "snr") + (("cells",) if self.family == "cells" else ())
        return FitConfig(families=fams, alphas=tuple(h.expert_alphas or DEFAULT_ALPHAS), noise_mode=h.expert_noise_mode,
                         min_samples=h.expert_min_samples, fallback=h.expert_fallback)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        self.data_fingerprint = dm.fingerprint_hash()
        if bool(self.prepared) or self.defer_to_checkpoint:
            return
        self.prepare(dm)

    @torch.no_grad()
    def prepare(self, dm) -> None:
        """Load or fit the experts for ``dm``, set the feature windows/PCA, fit the feature scaling."""
        cfg = self.fit_config()
        h = self.hparams
        if dm.n_pixels != self.experts.weight.shape[1]:
            raise ValueError(f"model was built for {self.experts.weight.shape[1]} pixels, data has {dm.n_pixels}")
        path = h.experts_path
        if path is None and h.experts_dir is not None:
            path = Path(h.experts_dir) / f"experts-{bundle_key(dm.fingerprint(), cfg)}.pt"
        bundle = load_or_fit(dm, cfg, path)
        fam = bundle.families[self.family]
        self.experts.load_arrays(fam.weight, fam.bias)
        self.global_expert.load_arrays(bundle.families["global"].weight, bundle.families["global"].bias)
        self.physics.set_wave(dm.wave)
        self.physics.set_pca(bundle.pca_mean, bundle.pca_components)
        self.attach_inputs(dm)
        self._fit_scalers(dm)
        self.prepared.fill_(True)

    def input_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The affine map ``weight [P, D], bias [P]`` of the gate's linear inputs: rows are the K
        experts, the global expert and PCA1-4 (P = K + 5)."""
        comps = self.physics.pca_components
        pca_bias = -(comps.double() @ self.physics.pca_mean.double()).to(comps.dtype)
        return (torch.cat([self.experts.weight, self.global_expert.weight, comps]),
                torch.cat([self.experts.bias, self.global_expert.bias, pca_bias]))

    def attach_inputs(self, dm) -> None:
        """Cache every split's gate inputs for this model's map and have ``dm`` stream them."""
        weight, bias = self.input_map()
        pixels = self.physics.pixels
        dm.attach_inputs({split: ensure_inputs(dm, split, weight, bias, pixels) for split in SPLITS}, weight[:, pixels])

    def _fit_scalers(self, dm) -> None:
        """Feature standardisation from the first ``feature_rows`` training rows with one fixed
        noise draw -- the same rows on every DDP rank, so every rank gets the same buffers."""
        gen = torch.Generator().manual_seed(0)
        phys, qual, seen = [], [], 0
        for batch in dm.stream("train", shuffle=False, batch_size=1024, cached=True).all_batches():
            p, q = self.raw_features(self.gate_inputs(dm.add_noise(batch, gen)))
            phys.append(p)
            qual.append(q)
            seen += p.shape[0]
            if seen >= self.hparams.feature_rows:
                break
        self.phys_scaler.fit(phys)
        self.qual_scaler.fit(qual)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["moe_data_fingerprint"] = self.data_fingerprint

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stored = checkpoint.get("moe_data_fingerprint")
        if stored and self.data_fingerprint and stored != self.data_fingerprint:
            raise ExpertsMismatchError(f"checkpoint was trained on data {stored}, but the datamodule holds data "
                                       f"{self.data_fingerprint}: its experts do not belong to this data")
        self.data_fingerprint = stored or self.data_fingerprint

    # ---- forward ---------------------------------------------------------------------------
    def gate_inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """The batch's (noisy) gate inputs ``proj, win, quality, var``: cached, or computed from its spectra."""
        if "proj" in batch:
            if any(k in batch for k in NOISE_KEYS):
                raise ValueError("clean training rows reached the model: noise them first (SpectraDataModule.add_noise)")
            return batch
        weight, bias = self.input_map()
        return row_inputs(batch["flux"], batch["error"], weight, bias, self.physics.pixels)

    def raw_features(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Physics [B, 13] and quality [B, 10] features before standardisation."""
        k = self.experts.n_experts
        phys = torch.cat([self.physics.window_features(inputs["win"]), inputs["proj"][:, k + 1:]], dim=-1)
        return phys, inputs["quality"]

    def route(self, batch: dict) -> torch.Tensor:
        """True group of each sample in this module's expert family [B] (oracle routing)."""
        return groups.group_of(self.family, batch["phys_bin"], batch["snr_bin"])

    def forward(self, batch: dict) -> MoEOutput:
        x = self.gate_inputs(batch)
        phys, qual = self.raw_features(x)
        gate = self.gate(self.phys_scaler(phys), self.qual_scaler(qual),
                         self.route(batch) if self.hparams.fusion == "oracle" else None)
        w = gate.weights
        k = self.experts.n_experts
        mu = x["proj"][:, :k]
        var = self.hparams.noise_level**2 * x["var"][:, :k]
        pred = (w * mu).sum(-1)
        sigma = ((w * (var + mu.square())).sum(-1) - pred.square()).clamp_min(0).sqrt()
        return MoEOutput(pred, sigma, w, mu, gate_entropy(w), gate.tau, x["proj"][:, k])

    # ---- steps -----------------------------------------------------------------------------
    def _loss(self, out: MoEOutput, batch: dict) -> dict[str, torch.Tensor]:
        mse = F.mse_loss(out.pred, batch["log_g"])
        ent = out.entropy.mean()
        return {"loss": mse + self.hparams.entropy_weight * ent, "mse": mse, "entropy": ent}

    def training_step(self, batch: dict, batch_idx: int):
        out = self(batch)
        losses = self._loss(out, batch)
        self.log("train/loss", losses["loss"], batch_size=out.pred.shape[0], prog_bar=True)
        self.log_dict({"train/mse": losses["mse"], "train/entropy": losses["entropy"]}, batch_size=out.pred.shape[0])
        if isinstance(self.gate, ProductGate):
            self.log_dict({"train/beta": self.gate.beta, "train/gamma": self.gate.gamma}, batch_size=out.pred.shape[0])
        return losses["loss"] if losses["loss"].requires_grad else None

    def _eval_step(self, batch: dict, metrics: SplitMetrics, prefix: str) -> MoEOutput:
        out = self(batch)
        route = self.route(batch)
        oracle = out.expert_preds.gather(1, route[:, None]).squeeze(1)
        metrics.update(out.pred, oracle, out.global_pred, batch["log_g"], out.entropy, batch["snr_bin"], batch["phys_bin"], out.tau)
        self.log(f"{prefix}/loss", self._loss(out, batch)["mse"], batch_size=out.pred.shape[0], prog_bar=prefix == "val")
        return out

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self._eval_step(batch, self.val_metrics, "val")
        if sum(len(b["snr"]) for b in self._fig_buffer) < MAX_FIGURE_SAMPLES:
            self._fig_buffer.append({"snr": batch["snr"].detach().cpu(), "entropy": out.entropy.detach().cpu(),
                                     "weights": out.weights.detach().cpu()})

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        out = self(batch)
        return {"row": batch["row"], "log_g_pred": out.pred, "log_g_sigma": out.sigma, "log_g_true": batch["log_g"],
                "snr": batch["snr"], "snr_bin": batch["snr_bin"], "phys_bin": batch["phys_bin"], "weights": out.weights}

    # ---- epoch ends --------------------------------------------------------------------------
    def _log_split(self, metrics: SplitMetrics, prefix: str) -> dict[str, float]:
        values = metrics.compute()
        metrics.reset()
        if values:
            self.log_dict({f"{prefix}/{k}": v for k, v in values.items()})
        return values

    def on_validation_epoch_end(self) -> None:
        self._log_split(self.val_metrics, "val")
        buf, self._fig_buffer = self._fig_buffer, []
        if not buf or not isinstance(self.logger, TensorBoardLogger) or self.trainer.sanity_checking:
            return
        from moe.plots import entropy_vs_snr

        weights = torch.cat([b["weights"] for b in buf])
        tb = self.logger.experiment
        tb.add_histogram("val/gate_weights", weights.flatten(), global_step=self.global_step)
        fig = entropy_vs_snr(torch.cat([b["snr"] for b in buf]).numpy(), torch.cat([b["entropy"] for b in buf]).numpy(),
                             weights.shape[1], title=f"Gate entropy vs SNR ({self.hparams.fusion}, epoch {self.current_epoch})")
        tb.add_figure("val/entropy_vs_snr", fig, global_step=self.global_step, close=True)

    def on_test_epoch_end(self) -> None:
        self._log_split(self.test_metrics, "test")

    # ---- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return None  # oracle / global: nothing to learn
        opt = self.optimizer_factory(params)
        warm = max(int(self.hparams.warmup_steps), 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm) if warm else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def summary_table(metrics: dict[str, float], prefix: str = "test") -> str:
    """A text table of overall and per-SNR-bin R^2, rho and mean gate entropy from logged metrics."""
    def get(key):
        v = metrics.get(f"{prefix}/{key}")
        return float(v) if v is not None else float("nan")

    lines = [f"{'slice':<8}{'R2':>9}{'entropy':>10}{'tau':>8}",
             f"{'all':<8}{get('r2'):>9.4f}{get('entropy'):>10.3f}{'':>8}"]
    for name in reversed(bins.SNR_BIN_NAMES):
        tau = get(f"tau_snr_{name}")
        lines.append(f"{'SNR ' + name:<8}{get(f'r2_snr_{name}'):>9.4f}{get(f'entropy_snr_{name}'):>10.3f}"
                     f"{(f'{tau:>8.2f}' if np.isfinite(tau) else ''):>8}")
    lines.append(f"rho = {get('rho'):.3f}   (R2 oracle {get('r2_oracle'):.4f}, R2 global {get('r2_global'):.4f}, "
                 f"MAE {get('mae'):.4f}, RMSE {get('rmse'):.4f})")
    return "\n".join(lines)
