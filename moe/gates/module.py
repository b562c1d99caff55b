"""``GatedMoE``: frozen Ridge experts, feature towers and a fusion gate, trained with MSE.

``log g = sum_k w_k(phys, qual) * expert_k(noisy flux)``; loss ``MSE(log g, truth)`` (+ an
optional entropy term). Also returns sigma, the per-star uncertainty of log g:

- the raw spread: by default ``spread^2 = sum_k w_k v_k + m``, the experts' exact noise variances
  ``v_k`` mixed by the gate plus a model-error variance ``m`` from a variance head (an MLP on the
  standardised gate features, ``log sum_k w_k v_k``, the log disagreement ``sum_k w_k (mu_k - mu)^2``
  and the prediction), trained on the training stream (fresh noise every epoch) with a beta-NLL
  (beta = 0.5) on the detached prediction's residual, so the gate's own objective stays MSE. The
  disagreement is not added to the variance: the prediction is the weighted mean, not a draw of one
  expert, and where the gate hedges between experts that disagree the mean is often right (added, it
  swamps sigma where experts disagree most and the head cannot take it back). Without the head (and
  for the oracle / global gates, which learn nothing): the mixture of each expert's noise plus
  model-error variance in the star's SNR bin (estimated on the validation split by the preparation
  step), law of total variance.
- recalibration, refitted after every validation epoch of a fit (a checkpoint keeps its epoch's):
  ``sigma = scale_b * ref_b * (spread / ref_b) ** gamma`` per SNR bin b
  (:func:`moe.experts.calibration.sigma_map`), fitted on a fixed sample of training stars
  (``calibration_rows``, each in ``calibration_draws`` seeded noise draws;
  :meth:`moe.data.folder.SpectraFolder.calibration_batches`) run through the model as it stands
  at the end of the epoch, such that z = (pred - true) / sigma has 68.3% within 1 and 95.4%
  within 2 and std 1 in every bin. The sample outnumbers the validation split several times, so
  the fit is that much less noisy: per-bin factors fitted on a 5k-star validation split move each
  bin's test coverage by about its own sampling error. The same stars and noise every epoch and in
  a resumed run: the fit depends on the model alone. ``gamma`` (one for all bins) sets the tails
  of z: a well-trained head leaves residuals lighter-tailed than a Gaussian (log g is bounded), and
  a scale alone cannot then hit both coverages. Then one factor for all bins from the
  validation split (:func:`moe.experts.calibration.validation_check`), shrunk to 1 within its
  sampling error: the held-out guard against experts or a head that fit the training stars better
  than new ones (logged as ``val/sigma_check``).

The module owns loss, metrics, optimiser and logging; the experts (:mod:`moe.experts`),
features (:mod:`moe.features`) and gates (:mod:`moe.gates.fusions`) are plain modules.
What is not learned -- experts, feature windows, PCA basis, feature scalers -- comes from
the preparation step (:func:`moe.prepare.prepare`, run by the CLI before the trainer) through
:meth:`GatedMoE.load_prepared`. It lives in buffers, so a checkpoint carries it; a
checkpoint made on other data is refused when loaded.

A batch is either spectra (``flux``, ``error``: the gate inputs are computed from them) or
cached gate inputs (``proj``, ``win``, ``quality``, ``var``; :mod:`moe.features.gate_inputs`),
already noisy: both give the same numbers.
"""

from __future__ import annotations

import logging
from typing import Literal, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeInt, PositiveInt
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.trainer.states import TrainerFn

from moe.catalogue.predict import catalogue_rows
from moe.data import bins
from moe.experts import groups
from moe.experts.bundle import ExpertsMismatchError
from moe.experts.calibration import apply_sigma_map, sigma_map, validation_check
from moe.experts.fit import FitConfig, NoiseMode
from moe.experts.groups import Family
from moe.experts.ridge import DEFAULT_ALPHAS
from moe.experts.ridge_experts import RidgeExperts
from moe.features import PHYSICS_NAMES, QUALITY_NAMES, PhysicsFeatures, Standardizer
from moe.features.gate_inputs import NOISE_KEYS, gate_features, projection_map, row_inputs
from moe.gates.checkpoints import check_state_fits
from moe.gates.fusions import FUSIONS, Fusion, ProductGate, build_gate, mlp
from moe.gates.metrics import LatestRows, SplitMetrics, gate_entropy
from moe.gates.schedules import LinearWarmup
from moe.prepare import PrepareConfig, Prepared

log = logging.getLogger(__name__)
MAX_FIGURE_SAMPLES = 20_000
CALIBRATION_CHUNK = 16384  # rows per forward pass of the sigma recalibration
VAL_RESIDUALS = 16384  # validation residuals kept per SNR bin (the whole split when it is smaller)


class MixInputs(NamedTuple):
    """A batch's inputs to the gate and the mixture (B batch, K experts); fixed once the batch is noisy."""

    phys: torch.Tensor  # [B, 13] standardised physics features
    qual: torch.Tensor  # [B, 10] standardised quality features
    mu: torch.Tensor  # [B, K] each expert's prediction
    noise_var: torch.Tensor  # [B, K] each expert's exact variance under the noise
    snr_bin: torch.Tensor  # [B]
    route: torch.Tensor | None  # [B] true group (oracle gate only)
    global_pred: torch.Tensor  # [B] the global expert

    @classmethod
    def cat(cls, parts: list[MixInputs]) -> MixInputs:
        """Batches' inputs as one (rows concatenated)."""
        fields = zip(*parts)
        return cls(*(None if f[0] is None else torch.cat(f) for f in fields))

    def slice(self, lo: int, hi: int) -> MixInputs:
        """Rows ``lo:hi``."""
        return type(self)(*(None if f is None else f[lo:hi] for f in self))


class MoEOutput(NamedTuple):
    """Everything one forward pass produces (B batch, K experts)."""

    pred: torch.Tensor  # [B] log g
    sigma: torch.Tensor  # [B] calibrated uncertainty of pred (1 sigma)
    weights: torch.Tensor  # [B, K]
    expert_preds: torch.Tensor  # [B, K]
    entropy: torch.Tensor  # [B] nats
    tau: torch.Tensor | None  # [B] (temperature gate)
    global_pred: torch.Tensor  # [B] the global expert (the baseline of rho)
    spread: torch.Tensor  # [B] sigma before the per-SNR-bin recalibration
    noise_spread: torch.Tensor  # [B] sqrt(sum_k w_k v_k): the experts' noise spreads, mixed
    log_model_var: torch.Tensor | None  # [B] the variance head's output


def default_family(fusion: str) -> str:
    """The expert family a fusion gates over unless ``experts`` says otherwise."""
    return {"quality_only": "snr", "global": "global"}.get(fusion, "phys")


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
        expert_min_samples: fewest training rows an expert's group may have; a smaller group is an
            error before any solve unless ``expert_fallback`` is set.
        expert_fallback: global: a too-small group uses the global expert instead of failing.
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
        expert_noise_mode: NoiseMode = "marginal",
        expert_alphas: list[float] | None = None,
        expert_min_samples: int = 50,
        expert_fallback: Literal["global"] | None = None,
        feature_rows: int = 20_000,
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
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose from {FUSIONS}")
        # plain numbers in the saved hyperparameters (the parser passes its restricted types)
        noise_level, calibration_rows, calibration_draws = (
            float(noise_level),
            int(calibration_rows),
            int(calibration_draws),
        )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        names = PHYSICS_NAMES + QUALITY_NAMES
        unknown = sorted(set(drop_features or ()) - set(names))
        if unknown:
            raise ValueError(f"unknown gate features {unknown}; choose from {list(names)}")
        self.register_buffer(
            "feature_mask",
            torch.tensor([n not in (drop_features or ()) for n in names], dtype=torch.float32),
            persistent=False,
        )
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
        learned = any(p.requires_grad for p in self.gate.parameters())
        # [phys, qual, log noise variance, log expert disagreement, prediction] -> log model-error variance
        self.variance_head = (
            mlp(len(PHYSICS_NAMES) + len(QUALITY_NAMES) + 3, [32], 1) if variance_head and learned else None
        )
        self.register_buffer("prepared", torch.tensor(False))
        self.register_buffer("model_var", torch.zeros(k, bins.N_SNR_BINS))  # [K, 4] model-error variance
        # [4] recalibration per SNR bin: sigma = scale * ref * (spread / ref) ** power (_recalibrate)
        self.register_buffer("sigma_scale", torch.ones(bins.N_SNR_BINS))
        self.register_buffer("sigma_ref", torch.ones(bins.N_SNR_BINS))
        self.register_buffer("sigma_power", torch.ones(bins.N_SNR_BINS))
        # this validation epoch's (|residual|, raw sigma) per SNR bin
        self.val_residuals = LatestRows(VAL_RESIDUALS, 2)
        self.val_metrics = SplitMetrics(with_tau=fusion == "temperature")
        self.test_metrics = SplitMetrics(with_tau=fusion == "temperature")
        self.data_fingerprint: str | None = None
        self.catalogue_reference = None  # what predict compares stars with (moe.prepare.reference); set by the CLI
        self._calibration: tuple[MixInputs, torch.Tensor] | None = None  # the calibration stars' inputs, per fit
        self._fig_buffer: list[dict[str, torch.Tensor]] = []

    # ---- prepared artefacts --------------------------------------------------------------
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
        )
        return PrepareConfig(self.family, fit, h.experts_dir, h.experts_path, h.feature_rows)

    @torch.no_grad()
    def load_prepared(self, prepared: Prepared) -> None:
        """Copy the prepared experts, feature windows, PCA basis and scalers into this module's buffers."""
        if prepared.family != self.family:
            raise ValueError(f"prepared for expert family {prepared.family!r}, this gate uses {self.family!r}")
        if prepared.experts.weight.shape[1] != self.experts.weight.shape[1]:
            raise ValueError(
                f"model was built for {self.experts.weight.shape[1]} pixels, "
                f"the data has {prepared.experts.weight.shape[1]}"
            )
        self.experts.load_arrays(prepared.experts.weight, prepared.experts.bias)
        self.global_expert.load_arrays(prepared.global_expert.weight, prepared.global_expert.bias)
        self.physics.load_state_dict(prepared.physics.state_dict())
        self.phys_scaler.load_state_dict(prepared.phys_scaler.state_dict())
        self.qual_scaler.load_state_dict(prepared.qual_scaler.state_dict())
        self.model_var.copy_(torch.as_tensor(prepared.model_var, dtype=self.model_var.dtype))
        for name in ("sigma_scale", "sigma_ref", "sigma_power"):  # refitted during training
            getattr(self, name).fill_(1.0)
        self.data_fingerprint = prepared.data_fingerprint
        self._calibration = None
        self.prepared.fill_(True)

    def input_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The affine map ``weight [P, D], bias [P]`` of the gate's linear inputs (:func:`moe.features.gate_inputs.projection_map`)."""
        return projection_map(self.experts, self.global_expert, self.physics)

    def on_fit_start(self) -> None:
        if not bool(self.prepared):
            raise RuntimeError(
                "GatedMoE has no prepared experts: call model.load_prepared(moe.prepare.prepare(folder, "
                "model.prepare_config())) before training (the CLI does)"
            )
        self._calibration = None  # built from this fit's data on the first recalibration

    def on_fit_end(self) -> None:
        self._calibration = None  # the calibration stars' inputs are needed only while fitting

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["moe_data_fingerprint"] = self.data_fingerprint

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stored = checkpoint.get("moe_data_fingerprint")
        if stored and self.data_fingerprint and stored != self.data_fingerprint:
            raise ExpertsMismatchError(
                f"checkpoint was trained on data {stored}, but the datamodule holds data "
                f"{self.data_fingerprint}: its experts do not belong to this data"
            )
        self.data_fingerprint = stored or self.data_fingerprint
        state = checkpoint.get("state_dict", {})
        self.upgrade_state(state)
        check_state_fits(self, state, "the checkpoint")

    @staticmethod
    def upgrade_state(state: dict) -> None:
        """Fill in, in place, what a ``state_dict`` saved by an earlier moe lacks and has a meaning for."""
        for name in ("sigma_ref", "sigma_power"):  # checkpoints from before the power map: the plain factor
            if "sigma_scale" in state and name not in state:
                state[name] = torch.ones_like(state["sigma_scale"])

    # ---- forward ---------------------------------------------------------------------------
    def gate_inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """The batch's (noisy) gate inputs ``proj, win, quality, var``: cached, or computed from its spectra."""
        if "proj" in batch:
            if any(k in batch for k in NOISE_KEYS):
                raise ValueError(
                    "clean training rows reached the model: noise them first (SpectraDataModule.add_noise)"
                )
            return batch
        weight, bias = self.input_map()
        return row_inputs(batch["flux"], batch["error"], weight, bias, self.physics.pixels)

    def raw_features(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Physics [B, 13] and quality [B, 10] features before standardisation."""
        return gate_features(self.physics, inputs, self.experts.n_experts)

    def standardised_features(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """What the towers read: standardised physics [B, 13] and quality [B, 10], dropped features at 0."""
        phys, qual = self.raw_features(inputs)
        n = phys.shape[1]
        return self.phys_scaler(phys) * self.feature_mask[:n], self.qual_scaler(qual) * self.feature_mask[n:]

    def route(self, batch: dict) -> torch.Tensor:
        """True group of each sample in this module's expert family [B] (oracle routing)."""
        return groups.group_of(self.family, batch["phys_bin"], batch["snr_bin"])

    def mix_inputs(self, batch: dict, noise_var: torch.Tensor | None = None) -> MixInputs:
        """What the gate and the mixture read from a batch (all fixed once the batch is noisy); ``noise_var``
        [B, K] replaces the experts' noise variances (a star with imputed pixels: :mod:`moe.catalogue.predict`)."""
        x = self.gate_inputs(batch)
        phys, qual = self.standardised_features(x)
        k = self.experts.n_experts
        return MixInputs(
            phys,
            qual,
            x["proj"][:, :k],
            self.hparams.noise_level**2 * x["var"][:, :k] if noise_var is None else noise_var,
            batch["snr_bin"],
            self.route(batch) if self.hparams.fusion == "oracle" else None,
            x["proj"][:, k],
        )

    def forward(self, batch: dict) -> MoEOutput:
        return self.mix(self.mix_inputs(batch))

    def mix(self, m: MixInputs) -> MoEOutput:
        """Gate weights, prediction and sigma from the mixture's inputs."""
        phys, qual, mu, noise_var, snr_bin = m.phys, m.qual, m.mu, m.noise_var, m.snr_bin
        gate = self.gate(phys, qual, m.route)
        w = gate.weights
        pred = (w * mu).sum(-1)
        noise_s2 = (w * noise_var).sum(-1).clamp_min(1e-12)  # the experts' exact noise variances, mixed
        log_model_var = None
        if self.variance_head is not None:
            disagreement = (w * (mu - pred[:, None]).square()).sum(-1)  # the experts' spread about the prediction
            head_in = torch.cat(
                [
                    phys,
                    qual,
                    noise_s2.detach().log()[:, None],
                    (disagreement.detach() + 1e-4).log()[:, None],
                    pred.detach()[:, None] - 3.0,
                ],
                dim=-1,
            )
            log_model_var = self.variance_head(head_in).squeeze(-1).clamp(-20, 10)
            spread = (noise_s2 + log_model_var.exp()).sqrt()
        else:
            var = noise_var + self.model_var.T[snr_bin]
            spread = ((w * (var + mu.square())).sum(-1) - pred.square()).clamp_min(1e-12).sqrt()
        return MoEOutput(
            pred,
            self.calibrated_sigma(spread, snr_bin),
            w,
            mu,
            gate_entropy(w),
            gate.tau,
            m.global_pred,
            spread,
            noise_s2.sqrt(),
            log_model_var,
        )

    def calibrated_sigma(self, spread: torch.Tensor, snr_bin: torch.Tensor) -> torch.Tensor:
        """Each star's SNR-bin recalibration applied to its raw spread [B]: ``scale * ref * (spread / ref) ** power``."""
        return apply_sigma_map(spread, self.sigma_scale[snr_bin], self.sigma_ref[snr_bin], self.sigma_power[snr_bin])

    # ---- steps -----------------------------------------------------------------------------
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
        if isinstance(self.gate, ProductGate):
            self.log_dict({"train/beta": self.gate.beta, "train/gamma": self.gate.gamma}, batch_size=out.pred.shape[0])
        return losses["loss"] if losses["loss"].requires_grad else None

    def _eval_step(self, batch: dict, metrics: SplitMetrics, prefix: str) -> MoEOutput:
        out = self(batch)
        route = self.route(batch)
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

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self._eval_step(batch, self.val_metrics, "val")
        self.val_residuals.update(torch.stack([(out.pred - batch["log_g"]).abs(), out.spread], -1), batch["snr_bin"])
        if sum(len(b["snr"]) for b in self._fig_buffer) < MAX_FIGURE_SAMPLES:
            self._fig_buffer.append(
                {
                    "snr": batch["snr"].detach().cpu(),
                    "entropy": out.entropy.detach().cpu(),
                    "weights": out.weights.detach().cpu(),
                    "snr_bin": batch["snr_bin"].detach().cpu(),
                    "z": ((out.pred - batch["log_g"]) / out.sigma).detach().cpu(),
                }
            )

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """Per star: split row, prediction, sigma, truth (NaN when unknown), SNR and bins, gate weights,
        each expert's prediction, entropy, masked pixels, OOD score, flags and the shard's numeric id columns
        (``id_*``) -- from the usable pixels (:mod:`moe.catalogue.predict`, with :attr:`catalogue_reference`; without
        one, spectra without masked pixels and no ``n_masked``, ``ood_score``, ``flags``)."""
        if self.catalogue_reference is not None:
            values = catalogue_rows(self, batch, self.catalogue_reference)
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
        buf, self._fig_buffer = self._fig_buffer, []
        if not buf or not isinstance(self.logger, TensorBoardLogger) or self.trainer.sanity_checking:
            return
        from moe.plots import calibration, entropy_vs_snr

        weights = torch.cat([b["weights"] for b in buf])
        tb = self.logger.experiment
        tb.add_histogram("val/gate_weights", weights.flatten(), global_step=self.global_step)
        fig = entropy_vs_snr(
            torch.cat([b["snr"] for b in buf]).numpy(),
            torch.cat([b["entropy"] for b in buf]).numpy(),
            weights.shape[1],
            title=f"Gate entropy vs SNR ({self.hparams.fusion}, epoch {self.current_epoch})",
        )
        tb.add_figure("val/entropy_vs_snr", fig, global_step=self.global_step, close=True)
        # z of this epoch's sigma (the factor refitted just now applies from the next epoch on)
        fig = calibration(
            torch.cat([b["z"] for b in buf]).numpy(),
            torch.cat([b["snr_bin"] for b in buf]).numpy(),
            title=f"Calibration of sigma on validation ({self.hparams.fusion}, epoch {self.current_epoch})",
        )
        tb.add_figure("val/calibration", fig, global_step=self.global_step, close=True)

    @torch.no_grad()
    def _recalibrate(self) -> None:
        """Refit the sigma recalibration (module docstring) on the datamodule's calibration stars and check
        it on this validation epoch's residuals, gathered across ranks (the same numbers on every rank)."""
        fitting = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        if fitting and not self.trainer.sanity_checking:  # validate / test keep the checkpoint's
            scale, ref, power = np.ones(bins.N_SNR_BINS), np.ones(bins.N_SNR_BINS), np.ones(bins.N_SNR_BINS)
            abs_r, spread, snr_bin = self._calibration_residuals()
            if len(abs_r):
                scale, ref, gamma = sigma_map(abs_r, spread, snr_bin)
                power[:] = gamma
            gather = self.all_gather if self.trainer.world_size > 1 else None
            val = [r.cpu().double().numpy() for r in self.val_residuals.rows(gather)]
            if any(len(p) for p in val):  # one factor for all bins: the held-out check of the training fit
                abs_z = np.concatenate(
                    [p[:, 0] / apply_sigma_map(p[:, 1], scale[i], ref[i], power[i]) for i, p in enumerate(val)]
                )
                check = validation_check(abs_z)
                scale = scale * check
                self.log("val/sigma_check", check)
            for name, v in (("sigma_scale", scale), ("sigma_ref", ref), ("sigma_power", power)):
                getattr(self, name).copy_(torch.as_tensor(v, dtype=self.sigma_scale.dtype))
        self.val_residuals.reset()

    @torch.no_grad()
    def _calibration_residuals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """|residual|, raw spread and SNR bin [N] of the datamodule's calibration stars
        (:meth:`~moe.data.folder.SpectraFolder.calibration_batches`) under the model as it stands; empty when
        the datamodule has none or ``calibration_rows`` is 0. Every rank computes the same rows.

        The stars' mixture inputs (features, expert predictions, noise variances) do not change while the
        experts and scalers are fixed, so they are computed once per fit and kept until it ends (23 + 2K + 3
        numbers a row: 24 MB for the default 65,536 rows x 2 draws and K = 9 experts); each epoch only runs
        the gate and the head.
        """
        if self._calibration is None:
            source = getattr(self.trainer.datamodule, "calibration_batches", None)
            h = self.hparams
            if source is None or not h.calibration_rows:
                return np.zeros(0), np.zeros(0), np.zeros(0, np.int64)
            parts = [
                (self.mix_inputs(batch), batch["log_g"])
                for batch in source(h.calibration_rows, h.calibration_draws, self.device)
            ]
            if not parts:  # no training rows to sample (all dropped as bad, or no draws asked for)
                return np.zeros(0), np.zeros(0), np.zeros(0, np.int64)
            self._calibration = MixInputs.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        inputs, target = self._calibration
        chunks = []
        for lo in range(0, len(target), CALIBRATION_CHUNK):
            out = self.mix(inputs.slice(lo, lo + CALIBRATION_CHUNK))
            chunks.append(torch.stack([(out.pred - target[lo : lo + CALIBRATION_CHUNK]).abs(), out.spread], -1))
        table = torch.cat(chunks).double().cpu().numpy()
        return table[:, 0], table[:, 1], inputs.snr_bin.cpu().numpy().astype(np.int64)

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


def summary_table(metrics: dict[str, float], prefix: str = "test") -> str:
    """A text table from logged metrics: overall and per-SNR-bin R^2, mean gate entropy, the calibration
    of sigma (z std, share of |z| <= 1 and <= 2) and tau; then rho, the oracle and global R^2, MAE, RMSE."""

    def get(key):
        v = metrics.get(f"{prefix}/{key}")
        return float(v) if v is not None else float("nan")

    def row(label: str, suffix: str) -> str:
        tau = get(f"tau{suffix}") if suffix else float("nan")
        return (
            f"{label:<8}{get(f'r2{suffix}'):>9.4f}{get(f'entropy{suffix}'):>10.3f}{get(f'z_std{suffix}'):>8.2f}"
            f"{get(f'coverage_1sigma{suffix}'):>9.1%}{get(f'coverage_2sigma{suffix}'):>9.1%}"
            f"{(f'{tau:>8.2f}' if np.isfinite(tau) else ''):>8}"
        )

    lines = [f"{'slice':<8}{'R2':>9}{'entropy':>10}{'z std':>8}{'|z|<=1':>9}{'|z|<=2':>9}{'tau':>8}", row("all", "")]
    lines += [row(f"SNR {name}", f"_snr_{name}") for name in reversed(bins.SNR_BIN_NAMES)]
    lines.append(
        f"rho = {get('rho'):.3f}   (R2 oracle {get('r2_oracle'):.4f}, R2 global {get('r2_global'):.4f}, "
        f"MAE {get('mae'):.4f}, RMSE {get('rmse'):.4f})"
    )
    return "\n".join(lines)
