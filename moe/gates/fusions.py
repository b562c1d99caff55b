r"""Gates: feature towers and how they fuse into weights over K experts.

Every gate maps ``(phys [B, 13], qual [B, 10], route [B])`` to a :class:`GateOutput` with
weights ``[B, S, K]``, each of the S rows on the simplex: S = 1 routes every label alike (shared
routing). :class:`PerLabelGates` gives each of L labels a gate network of its own (S = L; ``sets``
> 1 would instead grow one network's last layer to S K outputs, its hidden layers shared: measured
worse for log g, docs/training.md). ``route`` is the true group of each sample; only the oracle gate
reads it.

========== ===============================================================
concat     w = softmax(MLP([phys, qual]))          MLP 23 -> 32 -> 16 -> K
logit_add  w = softmax(f_phys(phys) + f_qual(qual))
product    w \propto p^beta * q^gamma, p = softmax(a), q = softmax(b), beta, gamma >= 0 learned
temperature w = softmax(f_phys(phys) / tau(qual)), tau = 1 + softplus(g(qual)) >= 1
phys_only  w = softmax(f_phys(phys))
quality_only w = softmax(f_qual(qual))            (over the 4 SNR experts)
oracle     w = one_hot(route)                     (nothing learned)
global     w = 1                                   (K = 1, nothing learned)
========== ===============================================================

The plain "probability product" ``normalise(softmax(a) * softmax(b))`` equals
``softmax(a + b)`` exactly (the normalisers cancel), i.e. it *is* the logit-add gate
(:func:`normalized_product`); ``product`` here is the distinct weighted product.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import nn

Fusion = Literal["concat", "logit_add", "product", "temperature", "phys_only", "quality_only", "oracle", "global"]
FUSIONS: tuple[str, ...] = get_args(Fusion)


def default_family(fusion: str) -> str:
    """The expert family a fusion gates over unless ``experts`` says otherwise."""
    return {"quality_only": "snr", "global": "global"}.get(fusion, "phys")


class GateOutput(NamedTuple):
    weights: torch.Tensor  # [B, S, K]: S = 1 (shared routing) or one row per label
    tau: torch.Tensor | None = None  # [B] temperature (temperature gate only)


def _sets(logits: torch.Tensor, sets: int) -> torch.Tensor:
    """[B, S K] logits -> [B, S, K]."""
    return logits.view(logits.shape[0], sets, -1)


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    """Linear-ReLU stack ending in a linear layer."""
    layers, d = [], in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def normalized_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The plain product fusion: softmax(a) * softmax(b), renormalised. Equals softmax(a + b)."""
    p = F.softmax(a, dim=-1) * F.softmax(b, dim=-1)
    return p / p.sum(-1, keepdim=True)


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


class ConcatGate(nn.Module):
    def __init__(self, phys_dim: int, qual_dim: int, n_experts: int, hidden: Sequence[int] = (32, 16), sets: int = 1):
        super().__init__()
        self.sets = sets
        self.net = mlp(phys_dim + qual_dim, hidden, n_experts * sets)

    def forward(self, phys, qual, route=None) -> GateOutput:
        return GateOutput(F.softmax(_sets(self.net(torch.cat([phys, qual], dim=-1)), self.sets), dim=-1))


class LogitAddGate(nn.Module):
    def __init__(
        self,
        phys_dim: int,
        qual_dim: int,
        n_experts: int,
        phys_hidden: Sequence[int] = (32, 16),
        qual_hidden: Sequence[int] = (16,),
        sets: int = 1,
    ):
        super().__init__()
        self.sets = sets
        self.phys_tower = mlp(phys_dim, phys_hidden, n_experts * sets)
        self.qual_tower = mlp(qual_dim, qual_hidden, n_experts * sets)

    def logits(self, phys, qual) -> tuple[torch.Tensor, torch.Tensor]:
        """Each tower's logits [B, S, K]."""
        return _sets(self.phys_tower(phys), self.sets), _sets(self.qual_tower(qual), self.sets)

    def forward(self, phys, qual, route=None) -> GateOutput:
        a, b = self.logits(phys, qual)
        return GateOutput(F.softmax(a + b, dim=-1))


class ProductGate(LogitAddGate):
    """w proportional to softmax(a)^beta * softmax(b)^gamma, beta = softplus(.), gamma = softplus(.) >= 0.

    Computed in log space: softmax(beta * log_softmax(a) + gamma * log_softmax(b)).
    beta = gamma = 1 (the start) is the logit-add gate; the learned exponents let one
    tower sharpen or flatten the other's opinion.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.raw_beta = nn.Parameter(torch.tensor(_inverse_softplus(1.0)))
        self.raw_gamma = nn.Parameter(torch.tensor(_inverse_softplus(1.0)))

    @property
    def beta(self) -> torch.Tensor:
        return F.softplus(self.raw_beta)

    @property
    def gamma(self) -> torch.Tensor:
        return F.softplus(self.raw_gamma)

    def forward(self, phys, qual, route=None) -> GateOutput:
        a, b = self.logits(phys, qual)
        return GateOutput(F.softmax(self.beta * F.log_softmax(a, -1) + self.gamma * F.log_softmax(b, -1), dim=-1))


class TemperatureGate(nn.Module):
    """Quality sets how sharp the physics gate may be: softmax(a / tau), tau = 1 + softplus(g(qual))."""

    def __init__(
        self,
        phys_dim: int,
        qual_dim: int,
        n_experts: int,
        phys_hidden: Sequence[int] = (32, 16),
        qual_hidden: Sequence[int] = (16,),
        sets: int = 1,
    ):
        super().__init__()
        self.sets = sets
        self.phys_tower = mlp(phys_dim, phys_hidden, n_experts * sets)
        self.tau_tower = mlp(qual_dim, qual_hidden, 1)

    def forward(self, phys, qual, route=None) -> GateOutput:
        tau = 1.0 + F.softplus(self.tau_tower(qual)).squeeze(-1)
        return GateOutput(F.softmax(_sets(self.phys_tower(phys), self.sets) / tau[:, None, None], dim=-1), tau)


class SingleTowerGate(nn.Module):
    """One tower on one input: ``phys_only`` (physics features) or ``quality_only`` (quality statistics)."""

    def __init__(self, source: str, in_dim: int, n_experts: int, hidden: Sequence[int] = (32, 16), sets: int = 1):
        super().__init__()
        if source not in ("phys", "qual"):
            raise ValueError(f"source must be 'phys' or 'qual', got {source!r}")
        self.source, self.sets = source, sets
        self.net = mlp(in_dim, hidden, n_experts * sets)

    def forward(self, phys, qual, route=None) -> GateOutput:
        return GateOutput(F.softmax(_sets(self.net(phys if self.source == "phys" else qual), self.sets), dim=-1))


class OracleGate(nn.Module):
    """All weight on the sample's true group (an upper reference; nothing is learned)."""

    def __init__(self, n_experts: int):
        super().__init__()
        self.n_experts = n_experts

    def forward(self, phys, qual, route) -> GateOutput:
        return GateOutput(F.one_hot(route, self.n_experts).to(phys.dtype)[:, None])


class GlobalGate(nn.Module):
    """The single global expert (weight 1)."""

    def forward(self, phys, qual, route=None) -> GateOutput:
        return GateOutput(torch.ones(phys.shape[0], 1, 1, dtype=phys.dtype, device=phys.device))


class PerLabelGates(nn.Module):
    """One gate network per label (``gates``, L of them), each trained by its own label's loss alone:
    weights [B, L, K], tau [B, L] (temperature gates) or None."""

    def __init__(self, gates: Sequence[nn.Module]):
        super().__init__()
        self.gates = nn.ModuleList(gates)

    def forward(self, phys, qual, route=None) -> GateOutput:
        outs = [gate(phys, qual, route) for gate in self.gates]
        tau = None if outs[0].tau is None else torch.stack([o.tau for o in outs], -1)
        return GateOutput(torch.cat([o.weights for o in outs], 1), tau)


def build_gate(fusion: str, phys_dim: int, qual_dim: int, n_experts: int, sets: int = 1) -> nn.Module:
    """The gate module of ``fusion`` for K = ``n_experts`` and S = ``sets`` weight rows (1: shared routing;
    the gates that learn nothing always route every label alike)."""
    if fusion == "concat":
        return ConcatGate(phys_dim, qual_dim, n_experts, sets=sets)
    if fusion == "logit_add":
        return LogitAddGate(phys_dim, qual_dim, n_experts, sets=sets)
    if fusion == "product":
        return ProductGate(phys_dim, qual_dim, n_experts, sets=sets)
    if fusion == "temperature":
        return TemperatureGate(phys_dim, qual_dim, n_experts, sets=sets)
    if fusion == "phys_only":
        return SingleTowerGate("phys", phys_dim, n_experts, sets=sets)
    if fusion == "quality_only":
        return SingleTowerGate("qual", qual_dim, n_experts, sets=sets)
    if fusion == "oracle":
        return OracleGate(n_experts)
    if fusion == "global":
        if n_experts != 1:
            raise ValueError("the global gate takes the single global expert (K = 1)")
        return GlobalGate()
    raise ValueError(f"unknown fusion {fusion!r}; choose from {FUSIONS}")
