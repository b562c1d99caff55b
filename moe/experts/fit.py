"""Fit every expert family from one streamed pass over the training split.

Every label of ``FitConfig.labels`` (log g, T_eff, [M/H], any numeric parameter column; checked first,
:func:`moe.data.labels.check_labels`) is fitted from the same passes:

1. One pass accumulates per-cell statistics (:mod:`moe.experts.stats`) of the training
   flux -- clean (``noise_mode='marginal'``, the noise enters in closed form), one noise
   draw per spectrum (``'single'``) or ``n_draws`` draws (``'augment'``) -- with every label's
   ``Xᵀy``, ``Σy``, ``Σy²`` beside the one Gram.
2. Every group of every family is solved for the whole alpha sweep, every label from the same
   factorisations (:mod:`moe.experts.ridge`) -- every label the family is fitted for: all of them unless
   ``FitConfig.family_labels`` names fewer (:mod:`moe.experts.label_sets`; the pass is the same).
3. One pass over the pre-noised validation split scores every (group, alpha, label) on the
   group's own samples; each group keeps its best alpha per label. The 36 ``cells`` experts are
   shrunk toward their selected physical expert (``w = argmin |y - Xw|^2 + a |w - w_phys|^2``)
   with one alpha per SNR bin, pooled over its nine cells.
4. The global group's (noisy-flux) covariance gives the PCA basis of the physics features.

Over several ranks (a torch.distributed process group, :mod:`moe.data.ranks`) every pass is split by
rows -- each rank reads its own share of the training and validation rows -- and its sums are added
up across the ranks; the group solves are dealt out round-robin and each one's result is sent to every
rank, so all ranks end with the same experts, each solved once. One process computes the same thing
alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

import numpy as np
import scipy.linalg as sla
from scipy.sparse.linalg import eigsh

from moe.data import bins, ranks
from moe.data.folder import SpectraFolder
from moe.data.labels import check_labels
from moe.data.noise import add_noise_np
from moe.data.shards import LABEL_COLUMNS
from moe.data.stream import SpectraStream
from moe.experts import groups
from moe.experts.label_sets import FamilyLabels, check_family_labels, label_index, labels_of
from moe.experts.ridge import DEFAULT_ALPHAS, METHODS, best_alpha_index, fit_sweep
from moe.experts.stats import PRODUCTS, CellStats, accumulate

log = logging.getLogger(__name__)
NoiseMode = Literal["marginal", "single", "augment"]
NOISE_MODES: tuple[str, ...] = get_args(NoiseMode)
EDGE_GAIN = 1e-4  # validation R^2 an expert must still gain at an end of the alpha sweep to be warned about


@dataclass(frozen=True)
class FitConfig:
    """How the experts are fitted (part of the cache key, except ``required``).

    A group with fewer than ``min_samples`` training rows stops the fit before any solve when a run relies
    on it -- the global expert always, a group of a ``required`` family (the families a gate mixes,
    :func:`moe.experts.groups.relies_on`; every fitted family when None) unless ``fallback`` is 'global'.
    Any other short group takes the global expert (its ``fallback`` note says so). Either way a fit that
    succeeds holds the same experts, so ``required`` is not part of the cache key; a cached bundle is
    checked against it when loaded (:func:`refuse_fallbacks`).

    ``labels``: the parameter-table columns fitted, each with its own experts and alphas (asked twice,
    fitted once). ``family_labels``: the families fitted for only some of them (a mapping or pairs family ->
    labels, kept as canonical pairs, :mod:`moe.experts.label_sets`); empty, the default: every family every
    label, and then no part of the cache key, so the keys of the fits before it stay what they were.
    """

    families: tuple[str, ...] = ("global", "phys", "snr")
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    noise_mode: str = "marginal"
    n_draws: int = 4
    products: str = "float64"
    method: str = "auto"
    min_samples: int = 50
    fallback: str | None = None
    required: tuple[str, ...] | None = None
    n_pca: int = 4
    block_rows: int = 4096
    seed: int = 0
    labels: tuple[str, ...] = LABEL_COLUMNS
    family_labels: FamilyLabels = ()

    def __post_init__(self):
        object.__setattr__(self, "families", groups.check_families(self.families))
        labels = (self.labels,) if isinstance(self.labels, str) else self.labels
        object.__setattr__(self, "labels", tuple(dict.fromkeys(str(label) for label in labels)))
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        object.__setattr__(self, "family_labels", check_family_labels(self.family_labels, self.families, self.labels))
        if self.required is not None:
            object.__setattr__(self, "required", groups.check_families(self.required))
        if self.noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {self.noise_mode!r}")
        if self.products not in PRODUCTS:
            raise ValueError(f"products must be one of {PRODUCTS}, got {self.products!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.fallback not in (None, "global"):
            raise ValueError(f"fallback must be None or 'global', got {self.fallback!r}")
        if self.noise_mode == "augment" and self.n_draws < 1:
            raise ValueError("n_draws must be >= 1")

    def key_dict(self) -> dict:
        d = asdict(self)
        d.pop("block_rows")
        d.pop("required")
        if self.noise_mode != "augment":
            d.pop("n_draws")
        if not self.family_labels:
            d.pop("family_labels")
        return d

    def labels_of(self, family: str) -> tuple[str, ...]:
        """The labels ``family`` is fitted for (every label of the fit unless ``family_labels`` names it)."""
        return labels_of(self.family_labels, family, self.labels)

    def needs_minimum(self, family: str) -> bool:
        """Whether a group of ``family`` short of ``min_samples`` rows stops the fit (else: the global expert)."""
        if family == "global":
            return True
        return self.fallback != "global" and (self.required is None or family in self.required)


@dataclass
class FamilyFit:
    """The selected experts of one family for one label and how they were chosen."""

    names: list[str]
    weight: np.ndarray  # [G, D] raw units
    bias: np.ndarray  # [G]
    alpha: np.ndarray  # [G] selected alpha
    n_train: np.ndarray  # [G]
    n_val: np.ndarray  # [G]
    val_sse: np.ndarray  # [G, A] validation sum of squared errors per alpha
    val_sst: np.ndarray  # [G] validation total sum of squares around the group mean
    fallback: list[str] = field(default_factory=list)  # per group: '' or what it fell back to
    path_weight: np.ndarray | None = None  # [G, A, D] every alpha of the sweep (raw units)
    path_bias: np.ndarray | None = None  # [G, A]
    y_mean: np.ndarray | None = None  # [G] the label's mean over the group's training rows
    y_std: np.ndarray | None = None  # [G] its (population) standard deviation there


class GroupTooSmallError(ValueError):
    """A group has fewer training samples than ``min_samples``."""


FLAGS_HINT = (
    "use more training rows, a smaller minimum or the global expert for small groups "
    "(moe fit: --model.expert_min_samples N / --model.expert_fallback global; "
    "moe experiments: --min-samples N / --fallback global)"
)


def short_groups_error(short: list[str], min_samples: int) -> GroupTooSmallError:
    """The one-line error naming the short groups (``family/name (rows)``) a run relies on, and the flags."""
    return GroupTooSmallError(
        f"{len(short)} expert group(s) have fewer than {min_samples} training rows: {', '.join(short)}; {FLAGS_HINT}"
    )


def check_group_sizes(stats: CellStats, partition: str, cfg: FitConfig) -> None:
    """The global expert and every group the run relies on (:meth:`FitConfig.needs_minimum`) have
    ``min_samples`` training rows: checked after the statistics pass and before any solve, naming every
    group that is short. Short groups of the other families take the global expert."""
    n_all = int(stats.n.sum())
    if n_all < cfg.min_samples:  # nothing to fall back to
        raise GroupTooSmallError(
            f"the global expert has {n_all} training rows, fewer than {cfg.min_samples}; use more training rows "
            "or a smaller minimum (moe fit: --model.expert_min_samples N; moe experts and moe experiments: "
            "--min-samples N)"
        )
    short = []
    for fam in ("phys", "snr"):
        if fam in cfg.families and cfg.needs_minimum(fam):
            for name, cells in zip(groups.group_names(fam), groups.members(fam, partition)):
                n = int(stats.n[cells].sum())
                if n < cfg.min_samples:
                    short.append(f"{fam}/{name} ({n})")
    if short:
        raise short_groups_error(short, cfg.min_samples)


def refuse_fallbacks(found: list[tuple[str, str, int]], cfg: FitConfig) -> None:
    """The check of :func:`check_group_sizes` on a fitted bundle's stand-ins ``found`` (family, group,
    training rows): a cached fit made for a run that did not rely on those groups may not serve one that does."""
    short = [f"{fam}/{name} ({n})" for fam, name, n in found if cfg.needs_minimum(fam)]
    if short:
        raise short_groups_error(short, cfg.min_samples)


def training_stream(folder: SpectraFolder, cfg: FitConfig) -> SpectraStream:
    return SpectraStream(
        folder.train_set, cfg.block_rows, folder.noise_level, cfg.block_rows, shuffle=False, labels=cfg.labels
    )


def label_matrix(batch: dict, labels: tuple[str, ...]) -> np.ndarray:
    """The label columns of a batch (numpy arrays) as one float64 [m, L] matrix, in ``labels`` order."""
    return np.stack([np.asarray(batch[label], dtype=np.float64) for label in labels], axis=1)


def training_blocks(folder: SpectraFolder, cfg: FitConfig, partition: str) -> Iterator[tuple]:
    """(x [m, D], error, y [m, L], cell) blocks of this rank's share of the training split."""
    for b in training_stream(folder, cfg).rank_blocks():
        cell = groups.cell_index(partition, b["phys_bin"], b["snr_bin"])
        y = label_matrix(b, cfg.labels)
        if cfg.noise_mode == "marginal":
            yield b["flux"], b["error"], y, cell
            continue
        for draw in range(cfg.n_draws if cfg.noise_mode == "augment" else 1):
            rng = np.random.default_rng([cfg.seed, int(b["row"][0]), draw])
            yield add_noise_np(b["flux"], b["error"], folder.noise_level, rng), b["error"], y, cell


def accumulate_stats(
    folder: SpectraFolder, cfg: FitConfig, progress: bool = True, grams: bool = True
) -> tuple[CellStats, str]:
    """Per-cell statistics of the training split: this rank's rows, summed over the ranks (the cells' Grams
    only with ``grams``; else each rank keeps its own, :meth:`CellStats.reduce_group_grams`)."""
    partition = groups.partition_for(cfg.families)
    draws = cfg.n_draws if cfg.noise_mode == "augment" else 1
    rank, world = ranks.rank_world()
    own = folder.train_set.kept(*folder.train_set.slot_range(rank, world))
    shift = common_shift(folder, cfg) if rank == 0 else None  # read by one rank, the same for all
    stats = accumulate(
        training_blocks(folder, cfg, partition),
        groups.n_cells(partition),
        folder.n_pixels,
        cfg.products,
        total=own * draws,
        progress=progress,
        shift=ranks.broadcast(shift),
        n_labels=len(cfg.labels),
    )
    return stats.all_reduce(grams), partition


def common_shift(folder: SpectraFolder, cfg: FitConfig) -> np.ndarray:
    """Mean clean flux of the split's first block that keeps a row (with ``bad_rows="drop"`` a block may
    keep none): the same on every rank; zeros when no training row is kept at all."""
    train = folder.train_set
    stream = SpectraStream(train, cfg.block_rows, folder.noise_level, cfg.block_rows)
    for block in train.blocks(0, train.n_rows, cfg.block_rows):
        if train.kept(block.offset, block.offset + (block.stop - block.start)) > 0:
            return stream.read(block)["flux"].mean(0, dtype=np.float64)
    return np.zeros(folder.n_pixels)


def noise_variance(folder: SpectraFolder, cfg: FitConfig) -> float:
    """The closed-form noise term's multiplier (0 when the pass saw noisy flux)."""
    return folder.noise_level**2 if cfg.noise_mode == "marginal" else 0.0


def _paths(
    stats: CellStats,
    partition: str,
    families: list[str],
    cfg: FitConfig,
    noise_var: float,
    prior: list | None = None,
    solver: dict | None = None,
    grams: dict | None = None,
) -> dict[str, tuple]:
    """Every group x alpha x label of ``families``: per family (weight [G, A, L, D], bias [G, A, L], n [G],
    fallback notes, label mean [G, L], label std [G, L]), L the labels the family is fitted for
    (:meth:`FitConfig.labels_of`, in the order of ``cfg.labels``).

    The solves are dealt out over the ranks round-robin and each result is broadcast from the rank that
    solved it (collective). A group too small takes the global expert (``fallback``) or, for ``cells``,
    its ``prior`` physical expert (per physical bin: weight [L, D], bias [L], the cells' labels). ``solver`` (a dict)
    accumulates ``systems``, ``factorizations`` and ``cg_steps``.

    ``grams`` (a dict) means ``stats`` holds this rank's own cell Grams only: each group's Gram is summed to
    the rank that solves it (:meth:`~moe.experts.stats.CellStats.reduce_group_grams`); the global group's
    is left in ``grams`` under ("global", 0) on the rank that solved it (the PCA's covariance).
    """
    d, a = stats.n_pixels, len(cfg.alphas)
    out, solve, own = {}, [], {f: label_index(cfg.family_labels, f, cfg.labels) for f in families}
    for family in families:
        names, cells, idx = groups.group_names(family), groups.members(family, partition), own[family]
        weight, bias = np.zeros((len(cells), a, len(idx), d)), np.zeros((len(cells), a, len(idx)))
        n = np.array([stats.n[c].sum() for c in cells])
        sy, syy = [stats.sy[c].sum(0)[idx] for c in cells], [stats.syy[c].sum(0)[idx] for c in cells]
        mean, std = _label_moments(n, sy, syy)
        notes = [""] * len(cells)
        for g in range(len(cells)):
            if family == "cells":
                if n[g] < 2:
                    weight[g], bias[g] = prior[g // bins.N_SNR_BINS][0], prior[g // bins.N_SNR_BINS][1]
                    notes[g] = "phys"
                    log.warning("expert %s has %d training samples: using its physical expert", names[g], n[g])
                    continue
            elif n[g] < cfg.min_samples:
                if not cfg.needs_minimum(family):
                    notes[g] = "global"  # filled in once the global expert is solved; said by the bundle's loader
                    continue
                raise GroupTooSmallError(
                    f"expert {family}/{names[g]} has {int(n[g])} training rows, fewer than {cfg.min_samples}; "
                    f"{FLAGS_HINT}"
                )
            solve.append((family, g))
        out[family] = (weight, bias, n, notes, mean, std)
    rank, world = ranks.rank_world()
    owners = [j % world for j in range(len(solve))]
    reduced = [None] * len(solve)
    if grams is not None:
        members = [groups.members(family, partition)[g] for family, g in solve]
        reduced = stats.reduce_group_grams(members, owners)
        grams |= {key: gram for key, gram in zip(solve, reduced) if gram is not None and key[0] == "global"}
    done = np.zeros(3)  # systems, factorizations, CG steps
    for j, (family, g) in enumerate(solve):
        if owners[j] == rank:
            info: dict = {}
            cells = groups.members(family, partition)[g]
            parent = prior[g // bins.N_SNR_BINS][0] if family == "cells" else None
            out[family][0][g], out[family][1][g], _ = fit_sweep(
                stats.group(cells, reduced[j]).select_labels(own[family]),
                cfg.alphas,
                noise_var,
                parent,
                cfg.method,
                info,
            )
            done += (len(cfg.alphas) * len(own[family]), info["factorizations"], sum(info["iterations"]))
    for j, (family, g) in enumerate(solve):
        ranks.broadcast_array(out[family][0][g], src=owners[j])
        ranks.broadcast_array(out[family][1][g], src=owners[j])
    for family in families:
        for g, note in enumerate(out[family][3]):
            if note == "global":  # the global expert holds every label: the family's own
                out[family][0][g], out[family][1][g] = (
                    out["global"][0][0][:, own[family]],
                    out["global"][1][0][:, own[family]],
                )
    if solver is not None:
        for k, v in zip(("systems", "factorizations", "cg_steps"), ranks.all_reduce_sum(done)):
            solver[k] = solver.get(k, 0) + int(v)
    return out


def _label_moments(n: np.ndarray, sy: list, syy: list) -> tuple[np.ndarray, np.ndarray]:
    """Per group and label, the mean and population std [G, L] from the count [G] and sums; NaN without rows."""
    sy, syy, n = np.asarray(sy, dtype=np.float64), np.asarray(syy, dtype=np.float64), n[:, None]
    mean = np.divide(sy, n, out=np.full_like(sy, np.nan), where=n > 0)
    var = np.divide(syy - sy * mean, n, out=np.full_like(sy, np.nan), where=n > 0)
    return mean, np.sqrt(np.clip(var, 0.0, None))


def validation_sse(
    folder: SpectraFolder, paths: dict[str, tuple[np.ndarray, np.ndarray]], labels: dict[str, tuple[str, ...]]
) -> dict[str, tuple]:
    """One pass over the pre-noised val split: per family, (sse [G, L, A], n [G], sst [G, L]) for the
    paths' (weight [G, A, L, D], bias [G, A, L]) of that family's ``labels`` (L of them).

    Each rank reads its share of the rows and the sums are added up over the ranks (collective), so every
    rank picks the same alphas.
    """
    fams = list(paths)
    flat_w = np.concatenate([paths[f][0].reshape(-1, paths[f][0].shape[-1]) for f in fams])
    flat_b = np.concatenate([paths[f][1].reshape(-1) for f in fams])
    offsets = np.cumsum([0] + [paths[f][1].size for f in fams])
    out = {}
    for f in fams:
        g_count, a_count, l_count = paths[f][1].shape
        out[f] = [
            np.zeros((g_count, a_count, l_count)),
            np.zeros(g_count),
            np.zeros((g_count, l_count)),
            np.zeros((g_count, l_count)),
        ]
    streamed = tuple(dict.fromkeys(name for f in fams for name in labels[f]))
    for tensors in folder.stream("val", batch_size=2048, labels=streamed):  # this rank's rows (all in one process)
        batch = {k: v.numpy() for k, v in tensors.items()}
        x = batch["flux"].astype(np.float64)
        pred = x @ flat_w.T + flat_b
        for i, f in enumerate(fams):
            g_count, a_count, l_count = paths[f][1].shape
            y = label_matrix(batch, labels[f])  # [N, L]
            p = pred[:, offsets[i] : offsets[i + 1]].reshape(-1, g_count, a_count, l_count)
            grp = groups.group_of(f, batch["phys_bin"], batch["snr_bin"])
            own = p[np.arange(len(y)), grp]  # [N, A, L]
            np.add.at(out[f][0], grp, (own - y[:, None, :]) ** 2)
            np.add.at(out[f][1], grp, 1.0)
            np.add.at(out[f][2], grp, y)
            np.add.at(out[f][3], grp, y**2)
    res = {}
    for f, sums in out.items():
        sse, n, sy, syy = (ranks.all_reduce_sum(v) for v in sums)
        sst = syy - np.divide(sy**2, n[:, None], out=np.zeros_like(sy), where=n[:, None] > 0)
        res[f] = (np.ascontiguousarray(sse.transpose(0, 2, 1)), n, sst)
    return res


def _select(family: str, sse: np.ndarray, n_val: np.ndarray) -> np.ndarray:
    """Index of the chosen alpha per group (one label's ``sse`` [G, A]): own val samples; cells pooled per SNR bin;
    no val -> pooled."""
    pooled = best_alpha_index(sse.sum(0))
    if family == "cells":
        per_snr = [best_alpha_index(sse[s :: bins.N_SNR_BINS].sum(0)) for s in range(bins.N_SNR_BINS)]
        return np.array([per_snr[g % bins.N_SNR_BINS] for g in range(sse.shape[0])])
    return np.array([best_alpha_index(sse[g]) if n_val[g] > 0 else pooled for g in range(sse.shape[0])])


def _family_fits(
    family: str, path, count, val, alphas, labels: tuple[str, ...], global_alpha: dict[str, float] | None = None
) -> dict[str, FamilyFit]:
    """Per label, the selected experts of ``family`` (:func:`_family_fit`) from the joint path (weight [G, A, L, D],
    bias [G, A, L]), counts (n [G], notes, mean [G, L], std [G, L]) and validation sums (sse [G, L, A], n [G],
    sst [G, L]); ``global_alpha``: each label's global alpha, for the groups the global expert stands in for."""
    weight, bias = path
    n_train, notes, mean, std = count
    sse, n_val, sst = val
    out = {}
    for j, label in enumerate(labels):
        g_idx = None if global_alpha is None else list(alphas).index(global_alpha[label])
        out[label] = _family_fit(
            family,
            label,
            (np.ascontiguousarray(weight[:, :, j]), np.ascontiguousarray(bias[:, :, j])),
            n_train,
            notes,
            (sse[:, j], n_val, sst[:, j]),
            alphas,
            g_idx,
        )
        out[label].y_mean, out[label].y_std = mean[:, j].copy(), std[:, j].copy()
    return out


def _family_fit(family: str, label: str, path, n_train, notes, val, alphas, global_idx: int | None = None) -> FamilyFit:
    """The selected experts of ``family`` for ``label``; a group standing in with the global expert (note 'global')
    takes the global expert's alpha ``global_idx`` -- the global expert itself, not an alpha picked on its few rows."""
    weight, bias = path
    sse, n_val, sst = val
    idx = _select(family, sse, n_val)
    stand_in = np.array([note == "global" for note in notes], dtype=bool)
    if global_idx is not None:
        idx[stand_in] = global_idx
    g = np.arange(weight.shape[0])
    _warn_at_grid_edge(family, label, np.where(stand_in, -1, idx), alphas, sse, sst)
    return FamilyFit(
        groups.group_names(family),
        weight[g, idx],
        bias[g, idx],
        np.asarray(alphas)[idx],
        n_train,
        n_val,
        np.ascontiguousarray(sse),
        np.ascontiguousarray(sst),
        notes,
        weight,
        bias,
    )


def _warn_at_grid_edge(family: str, label: str, idx: np.ndarray, alphas, sse: np.ndarray, sst: np.ndarray) -> None:
    """One warning per expert whose chosen alpha is the smallest or largest of the sweep while the
    validation R^2 still improves there (by more than ``EDGE_GAIN`` over the neighbouring alpha).

    A flat end is a plateau, not a missed optimum: in the marginal noise mode the noise variance
    already regularises, so every alpha far below it fits the same expert.
    """
    if len(alphas) < 2:
        return
    order = np.argsort(alphas)
    neighbour = {int(order[0]): int(order[1]), int(order[-1]): int(order[-2])}
    for g, (name, i) in enumerate(zip(groups.group_names(family), idx)):
        nb = neighbour.get(int(i))
        if nb is None or sst[g] <= 0:
            continue
        gain = (sse[g, nb] - sse[g, i]) / sst[g]
        if gain > EDGE_GAIN:
            low = i == order[0]
            log.warning(
                "expert %s/%s for %s: the validation chose alpha %g, the %s of the sweep, and R^2 still gains %.1e "
                "there; the best alpha may lie %s it (widen the sweep: --model.expert_alphas, or --alphas of "
                "the experts command)",
                family,
                name,
                label,
                alphas[i],
                "smallest" if low else "largest",
                gain,
                "below" if low else "above",
            )


def pca_basis(
    stats: CellStats, noise_var: float, k: int, gram: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` principal axes of the (noisy) training flux: mean [D], components [k, D], variances [k]
    (``gram``: the global group's Gram when ``stats`` holds no summed cell Grams)."""
    g = stats.group(np.arange(stats.n.size), gram)
    n = g.n[0]
    mu_s = g.sx[0] / n
    cov = (g.gram() - np.outer(g.sx[0], mu_s)) / n
    cov[np.diag_indices_from(cov)] += noise_var * g.se2[0] / n
    cov = 0.5 * (cov + cov.T)
    if k < cov.shape[0] // 4:
        val, vec = eigsh(cov, k=k, which="LA", v0=np.ones(cov.shape[0]))  # Lanczos: a few mat-vecs
    else:
        val, vec = sla.eigh(cov, subset_by_index=[cov.shape[0] - k, cov.shape[0] - 1], check_finite=False)
    order = np.argsort(val)[::-1]
    comps = vec[:, order].T
    sign = np.sign(comps[np.arange(k), np.argmax(np.abs(comps), axis=1)])
    return g.shift + mu_s, comps * sign[:, None], val[order]


def fit_families(folder: SpectraFolder, cfg: FitConfig, progress: bool = True):
    """Run the whole fit: (fits {label: {family: FamilyFit}}, (pca mean, components, variances), timings).

    The labels are checked against the shards first (:func:`moe.data.labels.check_labels`). In this process;
    the cached path (:func:`moe.experts.cache.load_or_fit`) runs it in a child process with the heap setting
    of :data:`moe.shared.heap.HEAP_ENV`."""
    t0 = time.perf_counter()
    check_labels(folder.train_set, folder.val_set, cfg.labels)
    # over several ranks each group's Gram goes only to the rank that solves it -- unless the cells are solved
    # too (every cell's Gram then), and the global one to rank 0 for the PCA (the global group is solved first)
    grams = {} if ranks.distributed() and "cells" not in cfg.families else None
    stats, partition = accumulate_stats(folder, cfg, progress, grams=grams is None)
    check_group_sizes(stats, partition, cfg)
    t1 = time.perf_counter()
    noise_var = noise_variance(folder, cfg)
    solver: dict = {}
    fams = [f for f in ("global", "phys", "snr") if f in cfg.families]
    _say(
        progress,
        "solving %s for %d alpha values each",
        ", ".join(_experts_phrase(f, cfg) for f in fams),
        len(cfg.alphas),
    )
    paths, counts = {}, {}
    for fam, result in _paths(stats, partition, fams, cfg, noise_var, solver=solver, grams=grams).items():
        paths[fam], counts[fam] = _split(result)
    if grams is not None:  # the cells' own Grams are spent (the groups' went to their solvers): 2.4 GB at 4096 px
        stats.xtx = np.empty((stats.xtx.shape[0], 0))
    t2 = time.perf_counter()
    _say(progress, "choosing each expert's alpha per label on the validation split")
    val = validation_sse(folder, paths, {fam: cfg.labels_of(fam) for fam in paths})
    fits: dict[str, dict[str, FamilyFit]] = {label: {} for label in cfg.labels}  # a family only under its labels
    for fam in paths:  # global first: its chosen alpha serves the groups it stands in for
        g_alpha = None if fam == "global" else {label: fits[label]["global"].alpha[0] for label in cfg.labels}
        own = cfg.labels_of(fam)
        for label, fit in _family_fits(fam, paths[fam], counts[fam], val[fam], cfg.alphas, own, g_alpha).items():
            fits[label][fam] = fit
    t3 = time.perf_counter()
    if "cells" in cfg.families:
        own = cfg.labels_of("cells")  # the phys family holds each of them (FitConfig checks)
        prior = [
            (
                np.stack([fits[label]["phys"].weight[k] for label in own]),
                np.array([fits[label]["phys"].bias[k] for label in own]),
            )
            for k in range(bins.N_PHYS_BINS)
        ]
        _say(progress, "solving the %s, shrunk toward their physical expert", _experts_phrase("cells", cfg))
        cpath, ccount = _split(_paths(stats, partition, ["cells"], cfg, noise_var, prior=prior, solver=solver)["cells"])
        cval = validation_sse(folder, {"cells": cpath}, {"cells": own})["cells"]
        for label, fit in _family_fits("cells", cpath, ccount, cval, cfg.alphas, own).items():
            fits[label]["cells"] = fit
    t4 = time.perf_counter()
    if grams is None:
        pca = pca_basis(stats, noise_var, cfg.n_pca)
    else:  # rank 0 solved the global group: it holds its Gram
        pca = ranks.broadcast(
            pca_basis(stats, noise_var, cfg.n_pca, grams[("global", 0)]) if ranks.rank_world()[0] == 0 else None
        )
    t5 = time.perf_counter()
    timings = {"stats_s": t1 - t0, "solve_s": (t2 - t1) + (t4 - t3), "validate_s": t3 - t2, "pca_s": t5 - t4, **solver}
    return fits, pca, timings


def _experts_phrase(family: str, cfg: FitConfig) -> str:
    """``'9 phys experts (log_g, T_eff, M_H)'``: a family's size and the labels it is fitted for."""
    size = groups.FAMILY_SIZES[family]
    return f"{size} {family} expert{'s' if size > 1 else ''} ({', '.join(cfg.labels_of(family))})"


def _say(progress: bool, message: str, *args) -> None:
    """A line saying what a long step of the fit is doing (INFO when progress is shown, else DEBUG)."""
    log.log(logging.INFO if progress else logging.DEBUG, message, *args)


def _split(result):
    weight, bias, n, notes, mean, std = result
    return (weight, bias), (n, notes, mean, std)
