"""The gated mixture, a plain module: frozen Ridge experts, gate features, a fusion gate, sigma -- for L labels.

``y_l = sum_k w_lk(phys, qual) * expert_kl(noisy flux)`` for every label l (``labels``: log g, T_eff, [M/H],
...), with one set of routing weights for all labels (``routing="shared"``: w_lk = w_k) or one per label
(``routing="per_label"``: a gate network per label, run side by side as one grouped network,
:mod:`moe.gates.fusions`). Targets and the variance head work on
standardised labels (``label_mean``, ``label_std``: the training split's); predictions and sigma are in the
label's units. And sigma, the per-star uncertainty of each label:

- the raw spread: by default ``spread^2 = sum_k w_k v_k + m``, the experts' exact noise variances
  ``v_k`` mixed by the gate plus a model-error variance ``m`` from a variance head (an MLP on the
  standardised gate features and, per label, ``log sum_k w_k v_k``, the log disagreement
  ``sum_k w_k (mu_k - mu)^2`` and the prediction, all standardised -> one log variance per label), trained on
  the training stream (fresh noise every epoch) with a beta-NLL
  (beta = 0.5) on the detached prediction's residual, so the gate's own objective stays MSE. The
  disagreement is not added to the variance: the prediction is the weighted mean, not a draw of one
  expert, and where the gate hedges between experts that disagree the mean is often right (added, it
  swamps sigma where experts disagree most and the head cannot take it back). Without the head (and
  for the oracle / global gates, which learn nothing): the mixture of each expert's noise plus
  model-error variance in the star's SNR bin (estimated on the validation split by the preparation
  step), law of total variance.
- its recalibration per SNR bin and label, and per cell of the standardised prediction within the bin
  (:class:`moe.gates.calibration.SigmaCalibration`), which also holds the error correlation of every pair of
  labels (``correlation``).

The experts (:mod:`moe.experts`), features (:mod:`moe.features`) and gates (:mod:`moe.gates.fusions`)
are plain modules. What is not learned -- experts, feature windows, PCA basis, feature scalers,
model-error variances, label statistics -- comes from the preparation step (:func:`moe.prepare.prepare`)
through :meth:`GatedMixture.load_prepared` into buffers, so a checkpoint carries it.

A batch is either spectra (``flux``, ``error``: the gate inputs are computed from them) or cached gate
inputs (``proj``, ``win``, ``quality``, ``var``; :mod:`moe.features.gate_inputs`), already noisy: both give
the same numbers. B batch, K experts, L labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

import torch
from torch import nn

from moe.data import bins
from moe.experts import groups
from moe.experts.ridge_experts import RidgeExperts
from moe.features import PHYSICS_NAMES, QUALITY_NAMES, PhysicsFeatures, Standardizer
from moe.features.gate_inputs import NOISE_KEYS, gate_features, projection_map, row_inputs
from moe.gates.calibration import SigmaCalibration
from moe.gates.error_correlation import pair_names
from moe.gates.fusions import FUSIONS, LearnedGate, build_gate, mlp
from moe.gates.metrics import gate_entropy
from moe.prepare import Prepared

Routing = Literal["shared", "per_label"]
ROUTINGS: tuple[str, ...] = get_args(Routing)


class MixInputs(NamedTuple):
    """A batch's inputs to the gate and the mixture (B batch, K experts, L labels); fixed once the batch is noisy."""

    phys: torch.Tensor  # [B, 13] standardised physics features
    qual: torch.Tensor  # [B, 10] standardised quality features
    mu: torch.Tensor  # [B, K, L] each expert's prediction of each label
    noise_var: torch.Tensor  # [B, K, L] each expert's exact variance under the noise
    snr_bin: torch.Tensor  # [B]
    route: torch.Tensor | None  # [B] true group (oracle gate only)
    global_pred: torch.Tensor  # [B, L] the global expert

    @classmethod
    def cat(cls, parts: list[MixInputs]) -> MixInputs:
        """Batches' inputs as one (rows concatenated)."""
        fields = zip(*parts)
        return cls(*(None if f[0] is None else torch.cat(f) for f in fields))

    def slice(self, lo: int, hi: int) -> MixInputs:
        """Rows ``lo:hi``."""
        return type(self)(*(None if f is None else f[lo:hi] for f in self))


class MoEOutput(NamedTuple):
    """Everything one forward pass produces (B batch, K experts, L labels), in the labels' units."""

    pred: torch.Tensor  # [B, L] each label
    sigma: torch.Tensor  # [B, L] calibrated uncertainty of pred (1 sigma)
    weights: torch.Tensor  # [B, L, K] (the same for every label with shared routing)
    expert_preds: torch.Tensor  # [B, K, L]
    entropy: torch.Tensor  # [B, L] nats, of each label's weights
    tau: torch.Tensor | None  # [B] (temperature gate; [B, L] with a gate per label)
    global_pred: torch.Tensor  # [B, L] the global expert (the baseline of rho)
    spread: torch.Tensor  # [B, L] sigma before the per-SNR-bin recalibration
    noise_spread: torch.Tensor  # [B, L] sqrt(sum_k w_k v_k): the experts' noise spreads, mixed
    log_model_var: torch.Tensor | None  # [B, L] the variance head's output, in standardised units


class GatedMixture(nn.Module):
    """A gate over frozen Ridge experts with a per-star sigma (module docstring); forward(batch) -> MoEOutput.

    Args (as :class:`moe.gates.GatedMoE`'s): ``fusion``, ``family`` (the expert family gated over),
    ``n_pixels`` D, ``noise_level``, ``drop_features``, ``variance_head``, ``calibration_rows`` and
    ``calibration_draws`` (:class:`~moe.gates.calibration.SigmaCalibration`), ``labels`` (parameter-table
    columns, L) and ``routing`` (shared | per_label).
    """

    def __init__(
        self,
        fusion: str,
        family: str,
        n_pixels: int,
        noise_level: float = 1.0,
        drop_features: list[str] | None = None,
        variance_head: bool = True,
        calibration_rows: int = 65_536,
        calibration_draws: int = 2,
        labels: Sequence[str] = ("log_g",),
        routing: str = "shared",
    ):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose from {FUSIONS}")
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}; choose from {ROUTINGS}")
        self.labels = tuple(labels)
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct and at least one, got {list(self.labels)}")
        names = PHYSICS_NAMES + QUALITY_NAMES
        unknown = sorted(set(drop_features or ()) - set(names))
        if unknown:
            raise ValueError(f"unknown gate features {unknown}; choose from {list(names)}")
        if family not in groups.FAMILIES:
            raise ValueError(f"unknown expert family {family!r}; choose from {groups.FAMILIES}")
        if fusion == "global" and family != "global":
            raise ValueError("fusion 'global' uses the global expert: leave experts unset or set it to 'global'")
        self.fusion, self.family, self.noise_level, self.routing = fusion, family, noise_level, routing
        self.register_buffer(
            "feature_mask",
            torch.tensor([n not in (drop_features or ()) for n in names], dtype=torch.float32),
            persistent=False,
        )
        k, n_labels = groups.FAMILY_SIZES[family], len(self.labels)
        self.experts = RidgeExperts(k, n_pixels, groups.group_names(family), self.labels)
        self.global_expert = RidgeExperts(1, n_pixels, ["global"], self.labels)
        self.physics = PhysicsFeatures(n_pixels)
        self.phys_scaler = Standardizer(len(PHYSICS_NAMES))
        self.qual_scaler = Standardizer(len(QUALITY_NAMES))
        networks = n_labels if routing == "per_label" else 1  # each label its own gate network
        self.gate = build_gate(fusion, len(PHYSICS_NAMES), len(QUALITY_NAMES), k, groups=networks)
        learned = isinstance(self.gate, LearnedGate)
        # [phys, qual, per label: log noise variance, log expert disagreement, prediction] -> log model-error
        # variance of each label (standardised units)
        self.variance_head = (
            mlp(len(PHYSICS_NAMES) + len(QUALITY_NAMES) + 3 * n_labels, [32], n_labels)
            if variance_head and learned
            else None
        )
        self.register_buffer("prepared", torch.tensor(False))
        # [K, L, 4] model-error variance of each expert and label per SNR bin
        self.register_buffer("model_var", torch.zeros(k, n_labels, bins.N_SNR_BINS))
        # the training split's mean and std of each label [L]: targets and the head's inputs are standardised
        self.register_buffer("label_mean", torch.zeros(n_labels))
        self.register_buffer("label_std", torch.ones(n_labels))
        self.calibration = SigmaCalibration(calibration_rows, calibration_draws, n_labels)

    @property
    def correlation_names(self) -> list[str]:
        """Catalogue column of each label pair's error correlation, in the order of ``calibration.rho``."""
        return pair_names(self.labels)

    def standardise(self, pred: torch.Tensor) -> torch.Tensor:
        """Predictions [B, L] in units of the training split's mean and std of each label."""
        return (pred - self.label_mean.to(pred)) / self.label_std.to(pred)

    def correlation(self, pred: torch.Tensor, snr_bin: torch.Tensor) -> torch.Tensor:
        """The calibrated error correlation of every label pair [B, P] of stars with predictions [B, L] in SNR
        bins [B] (:mod:`moe.gates.error_correlation`)."""
        return self.calibration.correlation(snr_bin, self.standardise(pred).to(self.calibration.rho))

    @torch.no_grad()
    def load_prepared(self, prepared: Prepared) -> None:
        """Copy the prepared experts, feature windows, PCA basis, scalers and model-error variances into
        buffers; sigma's recalibration starts again from the identity."""
        if prepared.family != self.family:
            raise ValueError(f"prepared for expert family {prepared.family!r}, this gate uses {self.family!r}")
        if tuple(prepared.labels) != self.labels:
            raise ValueError(f"prepared for labels {list(prepared.labels)}, this gate predicts {list(self.labels)}")
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
        stats = torch.as_tensor([prepared.label_stats[name] for name in self.labels], dtype=self.label_mean.dtype)
        self.label_mean.copy_(stats[:, 0])
        self.label_std.copy_(stats[:, 1])
        self.calibration.reset()
        self.prepared.fill_(True)

    def projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The affine map ``weight [P, D], bias [P]`` of the gate's linear inputs (:func:`moe.features.gate_inputs.projection_map`)."""
        return projection_map(self.experts, self.global_expert, self.physics)

    def gate_inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """The batch's (noisy) gate inputs ``proj, win, quality, var``: cached, or computed from its spectra."""
        if "proj" in batch:
            if any(k in batch for k in NOISE_KEYS):
                raise ValueError(
                    "clean training rows reached the model: noise them first (SpectraDataModule.add_noise)"
                )
            return batch
        weight, bias = self.projection()
        return row_inputs(batch["flux"], batch["error"], weight, bias, self.physics.pixels)

    def raw_features(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Physics [B, 13] and quality [B, 10] features before standardisation."""
        return gate_features(self.physics, inputs)

    def targets(self, batch: dict) -> torch.Tensor:
        """The batch's labels [B, L] in ``labels`` order (NaN where a shard does not carry them)."""
        return torch.stack([batch[name] for name in self.labels], -1)

    def standardised_features(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """What the towers read: standardised physics [B, 13] and quality [B, 10], dropped features at 0."""
        phys, qual = self.raw_features(inputs)
        n = phys.shape[1]
        return self.phys_scaler(phys) * self.feature_mask[:n], self.qual_scaler(qual) * self.feature_mask[n:]

    def route(self, batch: dict) -> torch.Tensor:
        """True group of each sample in this mixture's expert family [B] (oracle routing)."""
        return groups.group_of(self.family, batch["phys_bin"], batch["snr_bin"])

    def mix_inputs(self, batch: dict, noise_var: torch.Tensor | None = None) -> MixInputs:
        """What the gate and the mixture read from a batch (all fixed once the batch is noisy); ``noise_var``
        [B, K] replaces the experts' noise variances (a star with imputed pixels: :mod:`moe.catalogue.predict`)."""
        x = self.gate_inputs(batch)
        phys, qual = self.standardised_features(x)
        k, n = self.experts.n_experts, len(self.labels)
        kl = k * n
        return MixInputs(
            phys,
            qual,
            x["proj"][:, :kl].unflatten(1, (k, n)),
            self.noise_level**2 * x["var"][:, :kl].unflatten(1, (k, n)) if noise_var is None else noise_var,
            batch["snr_bin"],
            self.route(batch) if self.fusion == "oracle" else None,
            x["proj"][:, kl : kl + n],
        )

    def forward(self, batch: dict) -> MoEOutput:
        return self.mix(self.mix_inputs(batch))

    def mix(self, m: MixInputs) -> MoEOutput:
        """Gate weights, prediction and sigma of every label from the mixture's inputs."""
        phys, qual, mu, noise_var, snr_bin = m.phys, m.qual, m.mu, m.noise_var, m.snr_bin
        gate = self.gate(phys, qual, m.route)
        w = gate.weights.expand(-1, len(self.labels), -1)  # [B, L, K]
        mu_l = mu.transpose(1, 2)  # [B, L, K]
        pred = (w * mu_l).sum(-1)
        noise_s2 = (w * noise_var.transpose(1, 2)).sum(-1).clamp_min(1e-12)  # the experts' noise variances, mixed
        log_model_var = None
        if self.variance_head is not None:
            std2 = self.label_std.square()
            # the experts' spread about the prediction, standardised
            disagreement = (w * (mu_l - pred[..., None]).square()).sum(-1) / std2
            head_in = torch.cat(
                [
                    phys,
                    qual,
                    (noise_s2.detach() / std2).log(),
                    (disagreement.detach() + 1e-4).log(),
                    (pred.detach() - self.label_mean) / self.label_std,
                ],
                dim=-1,
            )
            log_model_var = self.variance_head(head_in).clamp(-20, 10)  # standardised units
            spread = (noise_s2 + log_model_var.exp() * std2).sqrt()
        else:
            var = (noise_var + self.model_var.permute(2, 0, 1)[snr_bin]).transpose(1, 2)  # [B, L, K]
            # law of total variance, about the prediction (no cancellation for labels in the thousands, T_eff)
            spread = (w * (var + (mu_l - pred[..., None]).square())).sum(-1).clamp_min(1e-12).sqrt()
        return MoEOutput(
            pred,
            self.calibration(spread, snr_bin, self.standardise(pred.detach())),
            w,
            mu,
            gate_entropy(w),
            gate.tau,
            m.global_pred,
            spread,
            noise_s2.sqrt(),
            log_model_var,
        )
