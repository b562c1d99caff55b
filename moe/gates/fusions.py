r"""Gates: feature towers and how they fuse into weights over K experts.

Every gate maps ``(phys [B, 13], qual [B, 10], route [B])`` to a :class:`GateOutput` with
weights ``[B, S, K]``, each of the S rows on the simplex: S = 1 routes every label alike (shared
routing). ``groups = L`` gives each of L labels a gate network of its own (S = L, per-label routing):
every layer holds the L networks' weights side by side (:class:`GroupedLinear`, [L, out, in]) and runs
them as one batched product, the same numbers as L separate networks (each label's network trained by
its own label's loss alone); ``sets`` > 1 would instead grow one network's last layer to S K outputs,
its hidden layers shared (measured worse for log g, docs/training.md). ``route`` is the true group of
each sample; only the oracle gate reads it.

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
    tau: torch.Tensor | None = None  # [B] temperature (temperature gate only; [B, G] with G networks)


def _rows(logits: torch.Tensor, rows: int) -> torch.Tensor:
    """[B, S K] logits of one network, or [G, B, S K] of G networks -> [B, G S, K] (network-major)."""
    if logits.dim() == 3:
        logits = logits.transpose(0, 1)
    return logits.reshape(logits.shape[0], rows, -1)


class GroupedLinear(nn.Module):
    """G linear layers side by side, group g's ``weight[g]`` [out, in] and ``bias[g]`` [out] those of an
    ``nn.Linear(in, out)``: x [B, in] (one input for every group: one matrix product) or [G, B, in] (each
    group its own: one batched product) -> [G, B, out]. Drawn group by group as G ``nn.Linear`` would be;
    ``draw=False`` leaves that to :func:`reset_groups` on the network that holds the layer (group-major)."""

    def __init__(self, groups: int, in_features: int, out_features: int, draw: bool = True):
        super().__init__()
        self.groups, self.in_features, self.out_features = groups, in_features, out_features
        self.weight = nn.Parameter(torch.empty(groups, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(groups, out_features))
        if draw:
            for g in range(groups):
                self.reset_group(g)

    @torch.no_grad()
    def reset_group(self, g: int) -> None:
        """Group g drawn as ``nn.Linear.reset_parameters`` draws its layer (the same calls on the global RNG)."""
        nn.init.kaiming_uniform_(self.weight[g], a=math.sqrt(5))
        bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
        nn.init.uniform_(self.bias[g], -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            out = F.linear(x, self.weight.flatten(0, 1), self.bias.flatten())  # [B, G out]
            return out.view(x.shape[0], self.groups, self.out_features).transpose(0, 1)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))

    def extra_repr(self) -> str:
        return f"groups={self.groups}, in_features={self.in_features}, out_features={self.out_features}"


def reset_groups(module: nn.Module) -> None:
    """Draw every :class:`GroupedLinear` of ``module`` group-major (group 0's layers in order, then group 1's,
    ...): what G separately built networks would have drawn, one after the other, from the same RNG state."""
    layers = [m for m in module.modules() if isinstance(m, GroupedLinear)]
    for g in range(max((m.groups for m in layers), default=0)):
        for layer in layers:
            layer.reset_group(g)


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, groups: int = 1) -> nn.Sequential:
    """Linear-ReLU stack ending in a linear layer: [B, in] -> [B, out]; with ``groups`` > 1, G such networks
    side by side (:class:`GroupedLinear`, not drawn yet: :func:`reset_groups` once the gate is built): [B, in]
    -> [G, B, out]."""

    def linear(d_in: int, d_out: int) -> nn.Module:
        return nn.Linear(d_in, d_out) if groups == 1 else GroupedLinear(groups, d_in, d_out, draw=False)

    layers, d = [], in_dim
    for h in hidden:
        layers += [linear(d, h), nn.ReLU()]
        d = h
    layers.append(linear(d, out_dim))
    return nn.Sequential(*layers)


def normalized_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The plain product fusion: softmax(a) * softmax(b), renormalised. Equals softmax(a + b)."""
    p = F.softmax(a, dim=-1) * F.softmax(b, dim=-1)
    return p / p.sum(-1, keepdim=True)


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


def stack_label_gates(state: dict, prefix: str) -> None:
    """A per-label gate saved as L separate networks (``<prefix>gates.<l>.<name>``: moe before the grouped
    layers) made the grouped gate's, in place: each ``<prefix><name>`` the L tensors stacked on a new first
    axis (label l's network is group l). A state without such keys is left as it is."""
    head = prefix + "gates."
    old = [k for k in state if k.startswith(head) and k[len(head) :].split(".", 1)[0].isdigit()]
    if not old:
        return
    names = dict.fromkeys(k[len(head) :].split(".", 1)[1] for k in old)  # in the saved order
    n = 1 + max(int(k[len(head) :].split(".", 1)[0]) for k in old)
    for name in names:
        parts = [state.pop(f"{head}{i}.{name}", None) for i in range(n)]
        if any(p is None for p in parts):  # an incomplete state: left for the loader to name what is missing
            state.update({f"{head}{i}.{name}": p for i, p in enumerate(parts) if p is not None})
            continue
        state[prefix + name] = torch.stack(parts)


class LearnedGate(nn.Module):
    """What the gates that learn share: ``groups`` G networks (one per label, or 1) of ``sets`` weight rows each,
    S = G sets rows in all; a state saved with G separate networks loads (:func:`stack_label_gates`)."""

    def __init__(self, groups: int = 1, sets: int = 1):
        super().__init__()
        if groups < 1 or sets < 1:
            raise ValueError(f"groups and sets must be >= 1, got {groups} and {sets}")
        self.groups, self.sets = groups, sets

    @property
    def rows(self) -> int:
        return self.groups * self.sets

    def _drawn(self) -> None:
        """Call at the end of ``__init__``: draw the grouped layers as G networks built one after the other."""
        if self.groups > 1:
            reset_groups(self)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.groups > 1:
            stack_label_gates(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _per_row(self, v: torch.Tensor) -> torch.Tensor:
        """A per-network value (scalar, or [G]) broadcastable against [B, S, K]."""
        return v if v.dim() == 0 else v.repeat_interleave(self.sets)[:, None]


class ConcatGate(LearnedGate):
    def __init__(
        self,
        phys_dim: int,
        qual_dim: int,
        n_experts: int,
        hidden: Sequence[int] = (32, 16),
        sets: int = 1,
        groups: int = 1,
    ):
        super().__init__(groups, sets)
        self.net = mlp(phys_dim + qual_dim, hidden, n_experts * sets, groups)
        self._drawn()

    def forward(self, phys, qual, route=None) -> GateOutput:
        return GateOutput(F.softmax(_rows(self.net(torch.cat([phys, qual], dim=-1)), self.rows), dim=-1))


class LogitAddGate(LearnedGate):
    def __init__(
        self,
        phys_dim: int,
        qual_dim: int,
        n_experts: int,
        phys_hidden: Sequence[int] = (32, 16),
        qual_hidden: Sequence[int] = (16,),
        sets: int = 1,
        groups: int = 1,
    ):
        super().__init__(groups, sets)
        self.phys_tower = mlp(phys_dim, phys_hidden, n_experts * sets, groups)
        self.qual_tower = mlp(qual_dim, qual_hidden, n_experts * sets, groups)
        self._drawn()

    def logits(self, phys, qual) -> tuple[torch.Tensor, torch.Tensor]:
        """Each tower's logits [B, S, K]."""
        return _rows(self.phys_tower(phys), self.rows), _rows(self.qual_tower(qual), self.rows)

    def forward(self, phys, qual, route=None) -> GateOutput:
        a, b = self.logits(phys, qual)
        return GateOutput(F.softmax(a + b, dim=-1))


class ProductGate(LogitAddGate):
    """w proportional to softmax(a)^beta * softmax(b)^gamma, beta = softplus(.), gamma = softplus(.) >= 0
    (one pair per network: scalars, or [G]).

    Computed in log space: softmax(beta * log_softmax(a) + gamma * log_softmax(b)).
    beta = gamma = 1 (the start) is the logit-add gate; the learned exponents let one
    tower sharpen or flatten the other's opinion.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        shape = () if self.groups == 1 else (self.groups,)
        self.raw_beta = nn.Parameter(torch.full(shape, _inverse_softplus(1.0)))
        self.raw_gamma = nn.Parameter(torch.full(shape, _inverse_softplus(1.0)))

    @property
    def beta(self) -> torch.Tensor:
        return F.softplus(self.raw_beta)

    @property
    def gamma(self) -> torch.Tensor:
        return F.softplus(self.raw_gamma)

    def forward(self, phys, qual, route=None) -> GateOutput:
        a, b = self.logits(phys, qual)
        beta, gamma = self._per_row(self.beta), self._per_row(self.gamma)
        return GateOutput(F.softmax(beta * F.log_softmax(a, -1) + gamma * F.log_softmax(b, -1), dim=-1))


class TemperatureGate(LearnedGate):
    """Quality sets how sharp the physics gate may be: softmax(a / tau), tau = 1 + softplus(g(qual))."""

    def __init__(
        self,
        phys_dim: int,
        qual_dim: int,
        n_experts: int,
        phys_hidden: Sequence[int] = (32, 16),
        qual_hidden: Sequence[int] = (16,),
        sets: int = 1,
        groups: int = 1,
    ):
        super().__init__(groups, sets)
        self.phys_tower = mlp(phys_dim, phys_hidden, n_experts * sets, groups)
        self.tau_tower = mlp(qual_dim, qual_hidden, 1, groups)
        self._drawn()

    def forward(self, phys, qual, route=None) -> GateOutput:
        tau = 1.0 + F.softplus(self.tau_tower(qual)).squeeze(-1)  # [B], or [G, B]
        if tau.dim() == 2:
            tau = tau.T  # [B, G]
        logits = _rows(self.phys_tower(phys), self.rows)  # [B, G S, K]
        per_row = tau[:, None] if tau.dim() == 1 else tau.repeat_interleave(self.sets, dim=1)
        return GateOutput(F.softmax(logits / per_row[..., None], dim=-1), tau)


class SingleTowerGate(LearnedGate):
    """One tower on one input: ``phys_only`` (physics features) or ``quality_only`` (quality statistics)."""

    def __init__(
        self, source: str, in_dim: int, n_experts: int, hidden: Sequence[int] = (32, 16), sets: int = 1, groups: int = 1
    ):
        super().__init__(groups, sets)
        if source not in ("phys", "qual"):
            raise ValueError(f"source must be 'phys' or 'qual', got {source!r}")
        self.source = source
        self.net = mlp(in_dim, hidden, n_experts * sets, groups)
        self._drawn()

    def forward(self, phys, qual, route=None) -> GateOutput:
        return GateOutput(F.softmax(_rows(self.net(phys if self.source == "phys" else qual), self.rows), dim=-1))


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


def build_gate(fusion: str, phys_dim: int, qual_dim: int, n_experts: int, sets: int = 1, groups: int = 1) -> nn.Module:
    """The gate module of ``fusion`` for K = ``n_experts``, ``groups`` networks (1, or one per label: per-label
    routing) of ``sets`` weight rows each (the gates that learn nothing always give one row: every label alike)."""
    if fusion == "concat":
        return ConcatGate(phys_dim, qual_dim, n_experts, sets=sets, groups=groups)
    if fusion == "logit_add":
        return LogitAddGate(phys_dim, qual_dim, n_experts, sets=sets, groups=groups)
    if fusion == "product":
        return ProductGate(phys_dim, qual_dim, n_experts, sets=sets, groups=groups)
    if fusion == "temperature":
        return TemperatureGate(phys_dim, qual_dim, n_experts, sets=sets, groups=groups)
    if fusion == "phys_only":
        return SingleTowerGate("phys", phys_dim, n_experts, sets=sets, groups=groups)
    if fusion == "quality_only":
        return SingleTowerGate("qual", qual_dim, n_experts, sets=sets, groups=groups)
    if fusion == "oracle":
        return OracleGate(n_experts)
    if fusion == "global":
        if n_experts != 1:
            raise ValueError("the global gate takes the single global expert (K = 1)")
        return GlobalGate()
    raise ValueError(f"unknown fusion {fusion!r}; choose from {FUSIONS}")
