"""``GatedMoE``: the LightningModule that trains a :class:`~moe.gates.mixture.GatedMixture` with MSE.

``y_l = sum_k w_lk(phys, qual) * expert_kl(noisy flux)`` for each label l of ``labels``; loss the MSE on
standardised labels (each label's residual over its training std, averaged over labels; + an optional
entropy term, + the variance head's beta-NLL), one shared step for train / val / test with per-split,
per-label metrics (:mod:`moe.gates.metrics`: ``val/r2_<label>`` ...; ``val/r2`` and the other plain names are
the primary label's, log g whenever it is predicted), the optimiser and its schedule. The mixture -- experts, features,
gate, sigma -- is a plain module (:mod:`moe.gates.mixture`); after every validation epoch of a fit the
module refits sigma's recalibration (:mod:`moe.gates.calibration`, logged as ``val/sigma_check``).
TensorBoard figures come from a callback (:class:`moe.gates.callbacks.ValidationFigures`). What is not
learned comes from the preparation step (:func:`moe.prepare.prepare`, run by the CLI before the
trainer) through :meth:`GatedMoE.load_prepared`; a checkpoint carries it, and one that does not fit
this model or its data is refused when loaded (:func:`moe.gates.checkpoints.check_checkpoint`).
"""

from __future__ import annotations

import functools
from typing import Literal

import pytorch_lightning as pl
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.trainer.states import TrainerFn

from moe.catalogue.predict import catalogue_rows
from moe.data.ranks import concat_ranks
from moe.data.shards import LABEL_COLUMNS
from moe.experts import groups
from moe.experts.fit import FitConfig, NoiseMode
from moe.experts.groups import Family
from moe.experts.ridge import DEFAULT_ALPHAS
from moe.gates.callbacks import ValidationFigures
from moe.gates.checkpoints import check_checkpoint, stack_label_gate_moments
from moe.gates.fusions import Fusion, ProductGate, default_family
from moe.gates.metrics import SplitMetrics, label_key
from moe.gates.mixture import GatedMixture, MoEOutput, Routing
from moe.gates.schedules import LinearWarmup
from moe.prepare import PrepareConfig, Prepared
from moe.shared.arguments import ToolArgumentError


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
        labels: the labels predicted, columns of the shards' parameter table (each with its experts, sigma and
            metrics); ``val/r2`` (checkpoints, early stopping) is log g's whenever log g is among them.
        routing: per_label (a gate network per label, each trained by its label's loss) or shared (one set of
            gate weights for every label).
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
        expert_min_samples: PositiveInt = FitConfig.min_samples,
        expert_fallback: Literal["global"] | None = None,
        feature_rows: int = PrepareConfig.feature_rows,
        entropy_weight: float = 0.0,
        drop_features: list[str] | None = None,
        variance_head: bool = True,
        nll_weight: float = 1.0,
        calibration_rows: NonNegativeInt = 65_536,
        calibration_draws: PositiveInt = 2,
        labels: list[str] = list(LABEL_COLUMNS),  # noqa: B006 (LightningCLI shows the default)
        routing: Routing = "per_label",
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable = LinearWarmup,
    ):
        super().__init__()
        # plain numbers in the saved hyperparameters (the parser passes its restricted types)
        noise_level, calibration_rows, calibration_draws, expert_min_samples = (
            float(noise_level),
            int(calibration_rows),
            int(calibration_draws),
            int(expert_min_samples),
        )
        labels = [str(name) for name in labels]
        if not labels or len(set(labels)) != len(labels):  # a user's mistake: one line, not the mixture's ValueError
            raise ToolArgumentError(
                f"--model.labels [{', '.join(labels)}]: give at least one label, each once", "moe fit"
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
            labels,
            routing,
        )
        self.family = self.mixture.family
        self.labels = self.mixture.labels
        self.primary = self.labels.index("log_g") if "log_g" in self.labels else 0  # whose metrics val/r2 is
        self.val_metrics = torch.nn.ModuleList(SplitMetrics(with_tau=fusion == "temperature") for _ in labels)
        self.test_metrics = torch.nn.ModuleList(SplitMetrics(with_tau=fusion == "temperature") for _ in labels)
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
            labels=self.labels,
        )
        return PrepareConfig(self.family, fit, h.experts_dir, h.experts_path, h.feature_rows, self.labels)

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
        trainable = [name for name, p in self.named_parameters() if p.requires_grad]  # the optimiser's order
        stack_label_gate_moments(checkpoint, trainable)  # per-label gates saved as L networks: resumable
        check_checkpoint(self, checkpoint, "the checkpoint", self.data_fingerprint)
        self.data_fingerprint = checkpoint.get("moe_data_fingerprint") or self.data_fingerprint

    def configure_callbacks(self) -> list[pl.Callback]:
        return [ValidationFigures()]

    # ---- steps -----------------------------------------------------------------------------
    def forward(self, batch: dict) -> MoEOutput:
        return self.mixture(batch)

    def _loss(self, out: MoEOutput, batch: dict) -> dict[str, torch.Tensor]:
        """MSE on standardised labels (mean over stars and labels), the mean gate entropy and the head's beta-NLL
        (standardised units)."""
        std = self.mixture.label_std
        resid = (out.pred - self.mixture.targets(batch)) / std  # [B, L]
        mse = resid.square().mean()
        ent = out.entropy.mean()
        losses = {"loss": mse + self.hparams.entropy_weight * ent, "mse": mse, "entropy": ent}
        if out.log_model_var is not None:  # the head learns the residual of the (detached) prediction
            var = (out.noise_spread.detach() / std).square() + out.log_model_var.exp()
            r2 = resid.detach().square()
            nll = (0.5 * (var.log() + r2 / var) * var.detach().sqrt()).mean()  # beta-NLL, beta = 0.5
            losses |= {"loss": losses["loss"] + self.hparams.nll_weight * nll, "nll": nll}
        return losses

    def training_step(self, batch: dict, batch_idx: int):
        out = self(batch)
        losses = self._loss(out, batch)
        self.log("train/loss", losses["loss"], batch_size=out.pred.shape[0], prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=out.pred.shape[0])
        gate = self.mixture.gate
        if isinstance(gate, ProductGate):  # the exponents: one pair, or one per label (per-label routing)
            exponents = {"beta": gate.beta, "gamma": gate.gamma}
            if gate.beta.dim() == 0:
                self.log_dict({f"train/{k}": v for k, v in exponents.items()}, batch_size=out.pred.shape[0])
            else:
                self.log_dict(
                    {
                        f"train/{label_key(k, name)}": v[i]
                        for k, v in exponents.items()
                        for i, name in enumerate(self.labels)
                    }
                    | {f"train/{k}": v[self.primary] for k, v in exponents.items()},
                    batch_size=out.pred.shape[0],
                )
        return losses["loss"] if losses["loss"].requires_grad else None

    def _eval_step(self, batch: dict, metrics: torch.nn.ModuleList, prefix: str) -> MoEOutput:
        out = self(batch)
        route = self.mixture.route(batch)
        oracle = out.expert_preds[torch.arange(len(route), device=route.device), route]  # [B, L]
        target = self.mixture.targets(batch)
        for i, m in enumerate(metrics):
            m.update(
                out.pred[:, i],
                oracle[:, i],
                out.global_pred[:, i],
                target[:, i],
                out.entropy[:, i],
                batch["snr_bin"],
                batch["phys_bin"],
                out.tau[:, i] if out.tau is not None and out.tau.ndim == 2 else out.tau,
                out.sigma[:, i],
            )
        self.log(
            f"{prefix}/loss", self._loss(out, batch)["mse"], batch_size=out.pred.shape[0], prog_bar=prefix == "val"
        )
        return out

    def validation_step(self, batch: dict, batch_idx: int) -> MoEOutput:
        out = self._eval_step(batch, self.val_metrics, "val")
        target = self.mixture.targets(batch)
        mixture = self.mixture
        mixture.calibration.observe(out.pred - target, out.spread, batch["snr_bin"], mixture.standardise(out.pred))
        return out  # for the callbacks (ValidationFigures)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """Per star: split row, ``<label>_pred``, ``<label>_sigma``, ``<label>_true`` (NaN when unknown) of every
        label, the error correlation ``rho_<a>_<b>`` of every pair of labels, SNR and bins, gate weights [B, L, K], each expert's prediction [B, K, L], entropy [B, L], masked
        pixels, OOD score, flags and the shard's numeric id columns (``id_*``) -- from the usable pixels (:mod:`moe.catalogue.predict`, with :attr:`catalogue_reference`; without
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
            values = {"weights": out.weights, "expert_preds": out.expert_preds, "entropy": out.entropy}
            for i, name in enumerate(self.labels):
                values |= {
                    f"{name}_pred": out.pred[:, i],
                    f"{name}_sigma": out.sigma[:, i],
                    f"{name}_true": batch[name],
                }
            rho = self.mixture.correlation(out.pred, batch["snr_bin"])
            values |= {name: rho[:, p] for p, name in enumerate(self.mixture.correlation_names)}
        keep = ("row", "snr", "snr_bin", "phys_bin")
        return values | {k: v for k, v in batch.items() if k in keep or k.startswith("id_")}

    # ---- epoch ends --------------------------------------------------------------------------
    def _log_split(self, metrics: torch.nn.ModuleList, prefix: str) -> dict[str, float]:
        """Log every label's metrics as ``<prefix>/<key>_<label>``, the primary label's also as ``<prefix>/<key>``;
        returns the primary label's."""
        primary = {}
        for i, (name, m) in enumerate(zip(self.labels, metrics)):
            values = m.compute()
            m.reset()
            self.log_dict({f"{prefix}/{label_key(k, name)}": v for k, v in values.items()})
            if i == self.primary:
                primary = values
        if primary:
            self.log_dict({f"{prefix}/{k}": v for k, v in primary.items() if k != "r2"})
            if "r2" in primary:  # the monitored metric, shown in the progress bar
                self.log(f"{prefix}/r2", primary["r2"], prog_bar=prefix == "val")
        return primary

    def on_validation_epoch_end(self) -> None:
        self._log_split(self.val_metrics, "val")
        self._recalibrate()

    @torch.no_grad()
    def _recalibrate(self) -> None:
        """Refit sigma's recalibration on the datamodule's calibration stars after a fit's validation epoch and
        check it on this epoch's validation residuals (:mod:`moe.gates.calibration`); validate / test keep the
        checkpoint's. Over several ranks each runs its share of the calibration stars and the residuals are
        gathered in rank order (:func:`moe.data.ranks.concat_ranks`): every rank fits on the whole sample."""
        calibration = self.mixture.calibration
        fitting = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        if fitting and not self.trainer.sanity_checking:
            source = getattr(self.trainer.datamodule, "calibration_batches", None)
            world = self.trainer.world_size
            if source is not None and world > 1:  # each rank runs its share of the sample; all fit on the whole
                source = functools.partial(source, share=(self.global_rank, world))
            mixture = self.mixture
            sample = calibration.sample_residuals(source, self.device, mixture.mix_inputs, mixture.mix, mixture.targets)
            if source is not None and world > 1:
                sample = concat_ranks(sample, self.all_gather, self.device)
            resid, spread, snr_bin, pred = sample
            x = mixture.standardise(torch.from_numpy(pred)).numpy()
            checks = calibration.refit(resid, spread, snr_bin, x, gather=self.all_gather if world > 1 else None)
            for i, (name, check) in enumerate(zip(self.labels, checks)):
                if check is not None:
                    self.log(f"val/sigma_check_{name}", check)
                    if i == self.primary:
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
