"""``GatedMoE``: the LightningModule that trains a :class:`~moe.gates.mixture.GatedMixture` with MSE.

``log g = sum_k w_k(phys, qual) * expert_k(noisy flux)``; loss ``MSE(log g, truth)`` (+ an optional
entropy term, + the variance head's beta-NLL), one shared step for train / val / test with per-split
metrics (:mod:`moe.gates.metrics`), the optimiser and its schedule. The mixture -- experts, features,
gate, sigma -- is a plain module (:mod:`moe.gates.mixture`); after every validation epoch of a fit the
module refits sigma's recalibration (:mod:`moe.gates.calibration`, logged as ``val/sigma_check``).
TensorBoard figures come from a callback (:class:`moe.gates.callbacks.ValidationFigures`). What is not
learned comes from the preparation step (:func:`moe.prepare.prepare`, run by the CLI before the
trainer) through :meth:`GatedMoE.load_prepared`; a checkpoint carries it, and one that does not fit
this model or its data is refused when loaded (:func:`moe.gates.checkpoints.check_checkpoint`).
"""

from __future__ import annotations

from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeInt, PositiveInt
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.trainer.states import TrainerFn

from moe.catalogue.predict import catalogue_rows
from moe.experts import groups
from moe.experts.fit import FitConfig, NoiseMode
from moe.experts.groups import Family
from moe.experts.ridge import DEFAULT_ALPHAS
from moe.gates.callbacks import ValidationFigures
from moe.gates.checkpoints import check_checkpoint
from moe.gates.fusions import Fusion, ProductGate, default_family
from moe.gates.metrics import SplitMetrics
from moe.gates.mixture import GatedMixture, MoEOutput
from moe.gates.schedules import LinearWarmup
from moe.prepare import PrepareConfig, Prepared


class GatedMoE(pl.LightningModule):
    """A gate over frozen Ridge experts (see module docstring).

    Args:
        fusion: the gate: concat (dual tower) | logit_add | product | temperature | phys_only |
            quality_only | oracle (true-bin routing, learns nothing) | global (the global expert alone).
        experts: expert family gated over (phys: 9 T_eff x [M/H] bins, snr: 4 SNR bins, cells: 36,
            global: 1); default by fusion (quality_only: snr, global: global, else phys).
        n_pixels: spectrum length D (linked from the datamodule).
        noise_level: noise multiplier of the data (linked; used for the predictive spread).
        experts_dir: where expert files are cached (linked: ``<data_dir>/experts``).
        experts_path: an explicit experts file (must match the data; overrides the cache).
        expert_noise_mode: how the experts see the noise: marginal (exact expectation over the noise,
            one pass), single (one noise draw per row) or augment (several draws).
        expert_alphas: Ridge penalties swept per expert, chosen on the validation split
            (default: 0.01 ... 1e6, 9 values).
        expert_min_samples: fewest training rows an expert's group may have; a smaller group of a family
            the gate mixes (:func:`moe.experts.groups.relies_on`) is an error before any solve unless
            ``expert_fallback`` is set; one of a family fitted alongside takes the global expert.
        expert_fallback: global: a too-small group of the gated family uses the global expert instead of failing.
        feature_rows: training rows used to fit the feature standardisation.
        entropy_weight: coefficient of the mean gate entropy added to the loss (0: pure MSE).
        drop_features: gate features (names of ``PHYSICS_NAMES`` / ``QUALITY_NAMES``) held at their
            training mean, i.e. 0 after standardisation (ablations).
        variance_head: learn each star's model-error variance (beta-NLL) instead of using the
            prepared per-expert, per-SNR-bin estimate.
        nll_weight: coefficient of the variance head's beta-NLL in the training loss.
        calibration_rows: training stars sigma is recalibrated on after each validation epoch (a fixed
            sample of whole blocks; 0: no recalibration, only the validation check).
        calibration_draws: noise draws of each of those stars.
        optimizer: optimiser factory (Adam by default).
        scheduler: learning-rate schedule factory, stepped per batch (linear warm-up over 5% of the run).
    """

    monitor = "val/r2"
    mode = "max"

    def __init__(
        self,
        fusion: Fusion = "concat",
        experts: Family | None = None,
        n_pixels: int = 4096,
        noise_level: float = 1.0,
        experts_dir: str | None = None,
        experts_path: str | None = None,
        expert_noise_mode: NoiseMode = FitConfig.noise_mode,
        expert_alphas: list[float] | None = None,
        expert_min_samples: int = FitConfig.min_samples,
        expert_fallback: Literal["global"] | None = None,
        feature_rows: int = PrepareConfig.feature_rows,
        entropy_weight: float = 0.0,
        drop_features: list[str] | None = None,
        variance_head: bool = True,
        nll_weight: float = 1.0,
        calibration_rows: NonNegativeInt = 65_536,
        calibration_draws: PositiveInt = 2,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable = LinearWarmup,
    ):
        super().__init__()
        # plain numbers in the saved hyperparameters (the parser passes its restricted types)
        noise_level, calibration_rows, calibration_draws = (
            float(noise_level),
            int(calibration_rows),
            int(calibration_draws),
        )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.mixture = GatedMixture(
            fusion,
            experts or default_family(fusion),
            n_pixels,
            noise_level,
            drop_features,
            variance_head,
            calibration_rows,
            calibration_draws,
        )
        self.family = self.mixture.family
        self.val_metrics = SplitMetrics(with_tau=fusion == "temperature")
        self.test_metrics = SplitMetrics(with_tau=fusion == "temperature")
        self.data_fingerprint: str | None = None
        self.catalogue_reference = None  # what predict compares stars with (moe.prepare.reference); set by the CLI

    # ---- prepared artefacts and checkpoints ----------------------------------------------------
    def prepare_config(self) -> PrepareConfig:
        """What the preparation step must build for this gate (:func:`moe.prepare.prepare`)."""
        h = self.hparams
        fams = ("global", "phys", "snr") + (("cells",) if self.family == "cells" else ())
        fit = FitConfig(
            families=fams,
            alphas=tuple(h.expert_alphas or DEFAULT_ALPHAS),
            noise_mode=h.expert_noise_mode,
            min_samples=h.expert_min_samples,
            fallback=h.expert_fallback,
            required=groups.relies_on(self.family),
        )
        return PrepareConfig(self.family, fit, h.experts_dir, h.experts_path, h.feature_rows)

    def load_prepared(self, prepared: Prepared) -> None:
        """Hand the mixture what the preparation step built (:meth:`GatedMixture.load_prepared`)."""
        self.mixture.load_prepared(prepared)
        self.data_fingerprint = prepared.data_fingerprint

    def on_fit_start(self) -> None:
        if not bool(self.mixture.prepared):
            raise RuntimeError(
                "GatedMoE has no prepared experts: call model.load_prepared(moe.prepare.prepare(folder, "
                "model.prepare_config())) before training (the CLI does)"
            )
        self.mixture.calibration.forget_sample()  # built from this fit's data on the first recalibration

    def on_fit_end(self) -> None:
        self.mixture.calibration.forget_sample()  # the calibration stars' inputs are needed only while fitting

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["moe_data_fingerprint"] = self.data_fingerprint

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint(self, checkpoint, "the checkpoint", self.data_fingerprint)
        self.data_fingerprint = checkpoint.get("moe_data_fingerprint") or self.data_fingerprint

    def configure_callbacks(self) -> list[pl.Callback]:
        return [ValidationFigures()]

    # ---- steps -----------------------------------------------------------------------------
    def forward(self, batch: dict) -> MoEOutput:
        return self.mixture(batch)

    def _loss(self, out: MoEOutput, batch: dict) -> dict[str, torch.Tensor]:
        mse = F.mse_loss(out.pred, batch["log_g"])
        ent = out.entropy.mean()
        losses = {"loss": mse + self.hparams.entropy_weight * ent, "mse": mse, "entropy": ent}
        if out.log_model_var is not None:  # the head learns the residual of the (detached) prediction
            var = out.noise_spread.detach().square() + out.log_model_var.exp()
            r2 = (out.pred.detach() - batch["log_g"]).square()
            nll = (0.5 * (var.log() + r2 / var) * var.detach().sqrt()).mean()  # beta-NLL, beta = 0.5
            losses |= {"loss": losses["loss"] + self.hparams.nll_weight * nll, "nll": nll}
        return losses

    def training_step(self, batch: dict, batch_idx: int):
        out = self(batch)
        losses = self._loss(out, batch)
        self.log("train/loss", losses["loss"], batch_size=out.pred.shape[0], prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=out.pred.shape[0])
        gate = self.mixture.gate
        if isinstance(gate, ProductGate):
            self.log_dict({"train/beta": gate.beta, "train/gamma": gate.gamma}, batch_size=out.pred.shape[0])
        return losses["loss"] if losses["loss"].requires_grad else None

    def _eval_step(self, batch: dict, metrics: SplitMetrics, prefix: str) -> MoEOutput:
        out = self(batch)
        route = self.mixture.route(batch)
        oracle = out.expert_preds.gather(1, route[:, None]).squeeze(1)
        metrics.update(
            out.pred,
            oracle,
            out.global_pred,
            batch["log_g"],
            out.entropy,
            batch["snr_bin"],
            batch["phys_bin"],
            out.tau,
            out.sigma,
        )
        self.log(
            f"{prefix}/loss", self._loss(out, batch)["mse"], batch_size=out.pred.shape[0], prog_bar=prefix == "val"
        )
        return out

    def validation_step(self, batch: dict, batch_idx: int) -> MoEOutput:
        out = self._eval_step(batch, self.val_metrics, "val")
        self.mixture.calibration.observe((out.pred - batch["log_g"]).abs(), out.spread, batch["snr_bin"])
        return out  # for the callbacks (ValidationFigures)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """Per star: split row, prediction, sigma, truth (NaN when unknown), SNR and bins, gate weights,
        each expert's prediction, entropy, masked pixels, OOD score, flags and the shard's numeric id columns
        (``id_*``) -- from the usable pixels (:mod:`moe.catalogue.predict`, with :attr:`catalogue_reference`; without
        one, spectra without masked pixels and no ``n_masked``, ``ood_score``, ``flags``)."""
        if self.catalogue_reference is not None:
            values = catalogue_rows(self.mixture, batch, self.catalogue_reference)
        else:  # no reference (a bare Trainer): whole spectra only, no catalogue columns
            usable = batch.get("usable")
            if usable is not None and not bool(usable.all()):
                raise RuntimeError(
                    "spectra with masked pixels need model.catalogue_reference = "
                    "moe.prepare.reference.load_or_build(folder, cache) (the CLI sets it)"
                )
            out = self(batch)
            values = {"log_g_pred": out.pred, "log_g_sigma": out.sigma, "log_g_true": batch["log_g"]}
            values |= {"weights": out.weights, "expert_preds": out.expert_preds, "entropy": out.entropy}
        keep = ("row", "snr", "snr_bin", "phys_bin")
        return values | {k: v for k, v in batch.items() if k in keep or k.startswith("id_")}

    # ---- epoch ends --------------------------------------------------------------------------
    def _log_split(self, metrics: SplitMetrics, prefix: str) -> dict[str, float]:
        values = metrics.compute()
        metrics.reset()
        if values:
            self.log_dict({f"{prefix}/{k}": v for k, v in values.items() if k != "r2"})
            if "r2" in values:  # the monitored metric, shown in the progress bar
                self.log(f"{prefix}/r2", values["r2"], prog_bar=prefix == "val")
        return values

    def on_validation_epoch_end(self) -> None:
        self._log_split(self.val_metrics, "val")
        self._recalibrate()

    @torch.no_grad()
    def _recalibrate(self) -> None:
        """Refit sigma's recalibration on the datamodule's calibration stars after a fit's validation epoch and
        check it on this epoch's validation residuals (:mod:`moe.gates.calibration`); validate / test keep the
        checkpoint's."""
        calibration = self.mixture.calibration
        fitting = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        if fitting and not self.trainer.sanity_checking:
            source = getattr(self.trainer.datamodule, "calibration_batches", None)
            sample = calibration.sample_residuals(source, self.device, self.mixture.mix_inputs, self.mixture.mix)
            check = calibration.refit(*sample, gather=self.all_gather if self.trainer.world_size > 1 else None)
            if check is not None:
                self.log("val/sigma_check", check)
        calibration.held_out.reset()

    def on_test_epoch_end(self) -> None:
        self._log_split(self.test_metrics, "test")

    # ---- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return None  # oracle / global: nothing to learn
        opt = self.optimizer_factory(params)
        sched = self.scheduler_factory(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        """Size the warm-up to the run once the trainer knows its length. Done here, not in
        ``configure_optimizers``: asking for ``estimated_stepping_batches`` there would open the training
        loader before a resumed run has restored its position (:mod:`moe.data.resume`)."""
        for config in self.trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, LinearWarmup):
                config.scheduler.set_total_steps(self.trainer.estimated_stepping_batches)
