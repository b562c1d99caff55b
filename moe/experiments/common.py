"""What every experiment shares: its settings, data access, results, verdicts, statistics and the report.

A report folder holds ``report.md`` (question, verdicts computed from the numbers, tables,
embedded figures, config and data fingerprint), every table as CSV, and the PNG figures.
Files are written atomically (:mod:`moe.shared.atomic`: a failed write is one WriteError, nothing left behind).
"""

from __future__ import annotations

import argparse
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from scipy import stats

from moe.data.datamodule import SpectraDataModule
from moe.data.noise import add_noise_np
from moe.data.synth import SynthConfig
from moe.experiments.gates import MAX_EPOCHS
from moe.experts.fit import FitConfig
from moe.experts.nonlinear import CNNExpert
from moe.experts.scores import r2, r2_from_sums
from moe.plots import save as save_figure
from moe.shared.arguments import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    declared_options,
    option,
    plain_number,
    settings_mistake,
)
from moe.shared.atomic import write_text

EXPERIMENT_LABELS = ("log_g",)  # the labels the experiments' experts are fitted for


class SettingsError(argparse.ArgumentError, ValueError):
    """A setting an experiment cannot work with, naming its command-line flag.

    An :class:`argparse.ArgumentError`, so the ``moe`` command prints it as one line
    (``moe: error: argument --n-train: ...``); a ValueError to code that calls the experiments.
    """

    def __init__(self, flag: str, message: str):
        super().__init__(None, message)
        self.argument_name = flag


@dataclass
class ExperimentSettings:
    """Command-line settings shared by all experiments. Each option field declares its flag, type and range once
    (:func:`moe.shared.arguments.option`): ``moe experiments`` parses by them, and a value set in code that does
    not fit is a :class:`SettingsError` naming the flag, worded as the parser words it."""

    data: str = option("--data", "data/synth")
    n_train: PositiveInt | None = option("--n-train", None)
    seeds: tuple[int, ...] = option("--seeds", (42,))
    out: str | None = option("--out", None)
    noise_level: NonNegativeFloat = option("--noise-level", 1.0)
    max_memory_rows: PositiveInt = option("--max-memory-rows", 50_000)
    # safety cap of a gate's epochs; gates stop on convergence well before it
    epochs: PositiveInt = option("--epochs", MAX_EPOCHS)
    cnn_epochs: NonNegativeInt = option("--cnn-epochs", CNNExpert.epochs)
    lgbm_device: str = option("--lgbm-device", "cpu")
    # fewest training rows of a phys/snr expert group; fallback "global": a smaller group takes the global expert
    min_samples: PositiveInt = option("--min-samples", FitConfig.min_samples)
    fallback: Literal["global"] | None = option("--fallback", None)
    progress: bool = True
    quick: bool = False  # a smoke run (--quick): the reports say their verdicts are not decisions

    def __post_init__(self):
        self.seeds = tuple(self.seeds)
        mistake = settings_mistake(self)
        if mistake is not None:
            raise SettingsError(mistake.flag, mistake.problem())
        for name in declared_options(type(self)):  # the parser's restricted numbers as plain ones (config.json)
            setattr(self, name, plain_number(getattr(self, name)))

    def datamodule(self, **kw) -> SpectraDataModule:
        return SpectraDataModule(
            self.data,
            noise_level=self.noise_level,
            max_train_rows=self.n_train,
            num_workers=0,
            synth=SynthConfig(),
            **kw,
        )

    def fit_config(
        self,
        families: tuple[str, ...],
        required: tuple[str, ...] | None = None,
        labels: tuple[str, ...] = EXPERIMENT_LABELS,
        family_labels: dict[str, tuple[str, ...]] | None = None,
    ) -> FitConfig:
        """The expert fit of an experiment over ``families`` for ``labels`` (``family_labels``: the families fitted
        for fewer, :mod:`moe.experts.label_sets`), with the group-size rule of ``--min-samples`` / ``--fallback``:
        a short group of a ``required`` family (those the experiment's questions use; all when None) stops the fit
        before any solve, naming these flags; one of another family takes the global expert."""
        # log g only by default: the experiments ask log g questions, and every further label multiplies the
        # solves (with 3 labels the dual tower's expert fit alone ran past 7 minutes of the default run's 30)
        return FitConfig(
            families=families,
            min_samples=self.min_samples,
            fallback=self.fallback,
            required=required,
            labels=labels,
            family_labels=family_labels or (),
        )

    @property
    def memory_train_rows(self) -> int:
        """Training rows an in-memory model gets: ``n_train`` capped by ``max_memory_rows``."""
        return self.max_memory_rows if self.n_train is None else min(self.n_train, self.max_memory_rows)

    @property
    def memory_flag(self) -> str:
        """The flag that sets ``memory_train_rows``: ``--n-train`` or ``--max-memory-rows``."""
        return "--n-train" if self.n_train is not None and self.n_train <= self.max_memory_rows else "--max-memory-rows"


def require_train_rows(have: int, need: int, experiment: str, why: str, flag: str = "--n-train") -> None:
    """Stop with a :class:`SettingsError` naming ``flag`` when an experiment gets fewer than ``need``
    training spectra (``have``), before any model is fitted."""
    if have < need:
        raise SettingsError(
            flag,
            f"{experiment} needs at least {need} training spectra ({why}); it would get {have}: "
            f"raise {flag} (or use a dataset with more training rows)",
        )


@dataclass
class Arrays:
    """The first rows of one split in memory (N rows, D pixels), as the experiments' in-memory models use them."""

    flux: np.ndarray | None  # [N, D] noisy (train: one draw; val/test: the pre-noised copy); None unless asked for
    error: np.ndarray | None  # [N, D]; None when not asked for (val/test of a model that reads the flux alone)
    clean: np.ndarray | None  # [N, D] noise-free train flux when asked for, else None
    log_g: np.ndarray  # [N]
    teff: np.ndarray  # [N]
    mh: np.ndarray  # [N]
    snr: np.ndarray  # [N]
    phys_bin: np.ndarray  # [N]
    snr_bin: np.ndarray  # [N]


def load_arrays(
    dm: SpectraDataModule,
    split: str,
    max_rows: int,
    seed: int = 0,
    keep_clean: bool = False,
    keep_flux: bool = True,
    keep_error: bool = True,
) -> Arrays:
    """The first ``max_rows`` rows of ``split``; train rows get one noise draw (``seed``). Without ``keep_flux``
    no flux is kept (a model of the error vectors alone then holds half the memory), without ``keep_error`` no
    error (train rows need theirs for the noise draw)."""
    parts, have = [], 0
    stream = dm.stream(split, shuffle=False, batch_size=4096)
    keep_error = keep_error or split == "train"  # train rows need theirs for the noise draw
    dropped = {name for name, keep in (("flux", keep_flux), ("error", keep_error)) if not keep}
    for b in stream:
        parts.append({k: v.numpy() for k, v in b.items() if k not in dropped})
        have += len(b["row"])
        if have >= max_rows:
            break
    cat = {k: np.concatenate([p[k] for p in parts])[:max_rows] for k in parts[0]}
    clean = cat["flux"] if (keep_clean and split == "train") else None
    flux = cat.get("flux")
    if split == "train" and flux is not None:
        flux = add_noise_np(flux, cat["error"], dm.noise_level, np.random.default_rng([seed, 7]))
    return Arrays(
        flux,
        cat.get("error"),
        clean,
        cat["log_g"].astype(np.float64),
        cat["T_eff"].astype(np.float64),
        cat["M_H"].astype(np.float64),
        cat["snr"].astype(np.float64),
        cat["phys_bin"],
        cat["snr_bin"],
    )


def load_splits(
    dm: SpectraDataModule,
    settings: ExperimentSettings,
    keep_clean: bool = False,
    keep_flux: bool = True,
    eval_error: bool = True,
) -> tuple[Arrays, Arrays, Arrays]:
    """Train, val and test in memory: train capped by ``settings.memory_train_rows`` with one noise
    draw (the first seed), val and test by ``settings.max_memory_rows``; without ``keep_flux``, no flux; without
    ``eval_error``, no val/test error (models that score the flux alone: 0.33 GB less for 20k test rows)."""
    return (
        load_arrays(dm, "train", settings.memory_train_rows, settings.seeds[0], keep_clean, keep_flux),
        load_arrays(dm, "val", settings.max_memory_rows, keep_flux=keep_flux, keep_error=eval_error),
        load_arrays(dm, "test", settings.max_memory_rows, keep_flux=keep_flux, keep_error=eval_error),
    )


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    n: int,
    n_boot: int = 1000,
    seed: int = 0,
    strata: np.ndarray | None = None,
) -> tuple[float, float]:
    """95% percentile interval of ``statistic(idx)`` over ``n_boot`` resamples ``idx`` of ``n`` rows drawn with
    replacement (within each stratum, keeping its size, when ``strata`` [n] is given)."""
    rng = np.random.default_rng(seed)
    groups = None if strata is None else [np.flatnonzero(strata == g) for g in np.unique(strata)]
    out = np.empty(n_boot)
    for i in range(n_boot):
        if groups is None:
            idx = rng.integers(0, n, n)
        else:
            idx = np.concatenate([g[rng.integers(0, g.size, g.size)] for g in groups])
        out[i] = statistic(idx)
    lo, hi = np.percentile(out, [2.5, 97.5])
    return float(lo), float(hi)


def _r2_rows(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """R^2 of each row of ``pred`` [S, N] against ``y`` [N]."""
    return r2_from_sums(((pred - y) ** 2).sum(1), ((y - y.mean()) ** 2).sum(), y.size)


def bootstrap_delta_r2(
    y: np.ndarray,
    pred_a: Sequence[np.ndarray],
    pred_b: Sequence[np.ndarray] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Paired bootstrap (over test spectra) 95% CI of R2(a) - R2(b), each averaged over seeds (S runs);
    of R2(a) itself without ``pred_b``."""
    y = np.asarray(y, float)
    pa = np.asarray(pred_a, float)
    pb = None if pred_b is None else np.asarray(pred_b, float)

    def delta(idx: np.ndarray) -> float:
        r2_a = _r2_rows(y[idx], pa[:, idx])  # [seeds]
        return float((r2_a - (0.0 if pb is None else _r2_rows(y[idx], pb[:, idx]))).mean())

    return bootstrap_ci(delta, y.size, n_boot, seed)


def bootstrap_min_group_delta_r2(
    y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, group: np.ndarray, groups: Sequence[int], n_boot: int = 1000
) -> tuple[float, float]:
    """95% CI of the smallest per-group R2(a) - R2(b) over ``groups`` (say, bins 3 and 6), the rows of each group
    resampled within it. y, pred_a, pred_b, group: [N]."""
    y, pa, pb = (np.asarray(v, float) for v in (y, pred_a, pred_b))
    rows = np.flatnonzero(np.isin(group, groups))
    y, pa, pb, group = y[rows], pa[rows], pb[rows], np.asarray(group)[rows]

    def smallest(idx: np.ndarray) -> float:
        gains = []
        for g in groups:
            sel = idx[group[idx] == g]
            gains.append(r2(y[sel], pa[sel]) - r2(y[sel], pb[sel]))
        return float(min(gains))

    return bootstrap_ci(smallest, y.size, n_boot, strata=group)


@dataclass(frozen=True)
class DataSummary:
    """What a report states about its dataset: folder, split sizes, pixels, noise level and fingerprint."""

    description: dict
    fingerprint: dict
    fingerprint_hash: str

    @classmethod
    def of(cls, dm: SpectraDataModule) -> DataSummary:
        return cls(dm.describe(), dm.fingerprint(), dm.fingerprint_hash())


@dataclass(kw_only=True)
class Results:
    """What every experiment's results hold next to its numbers: the data summary and the compute time [s]."""

    data: DataSummary
    compute_s: float


@dataclass(frozen=True)
class Verdict:
    """An experiment's decision rule evaluated on a measured value.

    ``inconclusive`` names why the measurement cannot carry a decision (a degenerate or
    unfinished run, a smoke run): such a verdict is neither PASS nor FAIL, whatever the value. With ``ci``,
    the 95% confidence interval of the value (a paired bootstrap over test spectra), the interval decides:
    PASS when the rule holds at both ends (for a comparison with a threshold, then on the whole interval),
    FAIL when it holds at neither, INCONCLUSIVE when it holds at one end only -- the data cannot tell the
    value from the threshold; more test spectra or seeds would.

    With ``seeds``, the value measured once per training seed (a difference between trained gates), the
    spread between trainings must decide too: the 95% interval of the mean over the S seeds,
    mean +- t(0.975, S-1) * sd / sqrt(S) (:attr:`seed_ci`), is read like ``ci``, and the verdict is PASS or
    FAIL only when both intervals agree at all four ends; one seed (no spread to read) is INCONCLUSIVE.
    """

    question: str
    value: float
    op: str  # '>=', '<', '<=' or '>'
    threshold: float
    if_pass: str
    if_fail: str
    inconclusive: str = ""
    ci: tuple[float, float] | None = None
    seeds: tuple[float, ...] | None = None  # the value per training seed, when trainings differ by seed
    hypothesis: str = ""  # the research notes' hypothesis the rule tests, as they state it

    def _holds(self, x: float) -> bool:
        ops: dict[str, Callable[[float, float], bool]] = {
            ">=": np.greater_equal,
            "<": np.less,
            "<=": np.less_equal,
            ">": np.greater,
        }
        return bool(np.isfinite(x) and ops[self.op](x, self.threshold))

    @property
    def seed_ci(self) -> tuple[float, float] | None:
        """95% interval of the mean over training seeds (:func:`seed_interval`); None without two or more."""
        return None if self.seeds is None else seed_interval(self.seeds)

    def _interval_reason(self, interval: tuple[float, float], what: str, decides: str) -> str:
        lo, hi = interval
        if not (np.isfinite(lo) and np.isfinite(hi)):
            return f"its {what} could not be computed (no test spectra in the slice)"
        if self._holds(lo) != self._holds(hi):
            return (
                f"its {what} [{lo:+.4f}, {hi:+.4f}] straddles the threshold {self.threshold:g}: {decides} would decide"
            )
        return ""

    @property
    def reason(self) -> str:
        """Why there is no decision ('' when there is one)."""
        if self.inconclusive:
            return self.inconclusive
        if self.ci is not None:
            why = self._interval_reason(self.ci, "95% CI", "more test spectra or seeds")
            if why:
                return why
        if self.seeds is not None:
            if len(self.seeds) < 2:
                return "one training seed: the spread between trainings is unknown (give --seeds with 3 or more)"
            why = self._interval_reason(self.seed_ci, f"seed interval over {len(self.seeds)} seeds", "more seeds")
            if why:
                return why
            if self.ci is not None and self._holds(self.ci[0]) != self._holds(self.seed_ci[0]):
                return "the test-star interval and the seed interval fall on opposite sides of the threshold"
        return ""

    @property
    def passed(self) -> bool:
        if self.reason:
            return False
        return self._holds(self.ci[0]) if self.ci is not None else self._holds(self.value)

    @property
    def result(self) -> str:
        return "INCONCLUSIVE" if self.reason else ("PASS" if self.passed else "FAIL")

    @property
    def decision(self) -> str:
        if self.reason:
            return f"no decision: {self.reason}"
        return self.if_pass if self.passed else self.if_fail

    @property
    def answer(self) -> str:
        """The verdict as one sentence: yes / no and what follows, or why it stays open."""
        if self.reason:
            return f"Open: {self.reason}."
        return f"Yes: {self.if_pass}." if self.passed else f"No: {self.if_fail}."

    def row(self) -> dict:
        seed_ci = self.seed_ci
        return {
            "question": self.question,
            "value": round(self.value, 4),
            "ci95": "–" if self.ci is None else f"[{self.ci[0]:+.4f}, {self.ci[1]:+.4f}]",
            "seeds": "–" if self.seeds is None else seed_mean_std(self.seeds) + f" ({len(self.seeds)})",
            "seed_ci95": "–" if seed_ci is None else f"[{seed_ci[0]:+.4f}, {seed_ci[1]:+.4f}]",
            "rule": f"{self.op} {self.threshold:g}",
            "result": self.result,
            "decision": self.decision,
        }


def _md_table(df: pd.DataFrame, floatfmt: int = 4) -> str:
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "–" if not np.isfinite(v) else f"{v:.{floatfmt}f}"
        return str(v)

    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


SEED_RULE = (
    "A verdict on a difference between trained gates holds only if it holds against both intervals: the paired "
    "bootstrap 95% CI over test stars (the seed-averaged difference, test stars resampled) and the 95% interval of "
    "the mean over training seeds (mean +- t(0.975, S-1) sd / sqrt(S) of the per-seed differences). PASS: the rule "
    "holds at all four ends; FAIL: at none; otherwise INCONCLUSIVE (one seed: always INCONCLUSIVE -- the spread "
    "between trainings is unknown)."
)
QUICK_NOTE = "Smoke run (--quick): tiny sizes, few epochs; its verdicts are not decisions."


@dataclass
class Report:
    """Collects an experiment's outputs and writes its folder (``runtime_s`` once written)."""

    out: Path
    experiment_id: str
    title: str
    question: str
    compute_s: float = 0.0  # time spent computing the results, counted in the runtime
    quick: bool = False  # a smoke run (--quick): the head says its verdicts are not decisions
    sections: list[str] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption) in order
    started: float = field(default_factory=time.time)

    def __post_init__(self):
        self.out = Path(self.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def text(self, heading: str, body: str) -> None:
        self.sections.append(f"## {heading}\n\n{body}\n")

    def table(self, name: str, df: pd.DataFrame, heading: str, note: str = "", floatfmt: int = 4) -> pd.DataFrame:
        write_text(self.out / f"{name}.csv", df.to_csv(index=False), "a report table")
        self.sections.append(
            f"## {heading}\n\n{_md_table(df, floatfmt)}\n\n{note + chr(10) if note else ''}(CSV: `{name}.csv`)\n"
        )
        return df

    def figure(self, filename: str, fig, caption: str) -> Path:
        path = self.out / filename
        save_figure(fig, path)
        self.figures.append((filename, caption))
        self.sections.append(f"![{caption}]({filename})\n\n*{caption}*\n")
        return path

    def verdicts(self, verdicts: Sequence[Verdict]) -> pd.DataFrame:
        df = pd.DataFrame([v.row() for v in verdicts])
        write_text(self.out / "verdicts.csv", df.to_csv(index=False), "the verdicts table")
        self.sections.insert(0, "## Verdicts (computed from the numbers below)\n\n" + _md_table(df) + "\n")
        return df

    def write(self, settings: ExperimentSettings, data: DataSummary, extra: dict | None = None) -> Path:
        config = {
            "experiment": self.experiment_id,
            "settings": asdict(settings),
            **(extra or {}),
            "data": data.description,
            "data_fingerprint": data.fingerprint,
            "data_fingerprint_hash": data.fingerprint_hash,
            "runtime_s": round(self.compute_s + time.time() - self.started, 1),
            "torch": torch.__version__,
        }
        write_text(self.out / "config.json", json.dumps(config, indent=2, default=str), "the report config")
        about = data.description
        head = (
            f"# {self.title}\n\n**Experiment:** `{self.experiment_id}`  \n**Data:** `{about['data_dir']}` "
            f"({about.get('source', 'unknown source')}; {about['n_train']} train / {about['n_val']} val / "
            f"{about['n_test']} test, {about['n_pixels']} px, noise_level {about['noise_level']}; fingerprint "
            f"`{data.fingerprint_hash}`)  \n**Seeds:** {', '.join(map(str, settings.seeds))}  \n"
            f"**Runtime:** {config['runtime_s']:.0f} s\n\n"
            + (f"> **{QUICK_NOTE}**\n\n" if self.quick else "")
            + f"**Question.** {self.question}\n"
        )
        tail = (
            "## Config and data fingerprint\n\n```json\n"
            + json.dumps(
                {k: config[k] for k in ("settings", "data", "data_fingerprint_hash")} | (extra or {}),
                indent=2,
                default=str,
            )
            + "\n```\n\nFull fingerprint (shards, sizes, rows): `config.json`.\n"
        )
        path = self.out / "report.md"
        write_text(path, "\n".join([head, *self.sections, tail]), "the report")
        self.runtime_s = config["runtime_s"]
        return path


def seed_interval(values: Sequence[float]) -> tuple[float, float] | None:
    """95% interval of the mean of ``values`` (one per training seed, S of them): mean +- t(0.975, S-1) * sd / sqrt(S)
    with the sample sd; None for fewer than two values."""
    v = np.asarray(values, float)
    if v.size < 2:
        return None
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return float(v.mean() - half), float(v.mean() + half)


def seed_interval_text(values: Sequence[float]) -> str:
    """:func:`seed_interval` as ``[lo, hi]`` ('–' for one value)."""
    interval = seed_interval(values)
    return "–" if interval is None else f"[{interval[0]:+.4f}, {interval[1]:+.4f}]"


def seed_mean_std(values: Sequence[float]) -> str:
    """``mean ± sd`` over seeds (sample sd, ddof 1); the value alone for one seed."""
    v = np.asarray(values, float)
    return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if v.size > 1 else f"{v.mean():.4f}"


@dataclass
class Outcome:
    """What a run of an experiment hands back: where its report is, its headline table and its verdicts."""

    experiment: Experiment
    report: Path  # the report folder
    headline: pd.DataFrame
    verdicts: list[Verdict]
    figures: list[tuple[str, str]]  # (file name in ``report``, caption)
    runtime_s: float
    settings: ExperimentSettings
    data: DataSummary
    answer: str  # the experiment's question answered in a sentence


class Experiment(ABC):
    """The template every experiment fills in: compute -> results -> verdicts -> report sections.

    :meth:`run` computes the results (no file written), judges them with :meth:`verdicts` and writes
    the report folder: the verdicts first, then the sections :meth:`sections` adds (headline, tables,
    figures), then the config and data fingerprint. A smoke run (``settings.quick``) keeps every verdict
    open, whatever its numbers. A subclass names its command (``name``), id, title, question and the research
    notes' hypothesis behind it.
    """

    name: ClassVar[str]  # the command and default report folder, e.g. "dual-tower"
    experiment_id: ClassVar[str]
    title: ClassVar[str]
    question: ClassVar[str]
    hypothesis: ClassVar[str]  # the research notes' hypothesis behind the question, as they state it
    default_seeds: ClassVar[tuple[int, ...]] = (42,)  # seeds when --seeds is not given

    @abstractmethod
    def compute(self, settings: ExperimentSettings) -> Results:
        """Every number of the report; writes no file."""

    @abstractmethod
    def verdicts(self, results: Results) -> list[Verdict]:
        """The decision rules of the research notes evaluated on ``results``."""

    @abstractmethod
    def sections(self, report: Report, results: Results, settings: ExperimentSettings) -> None:
        """Add the headline, tables and figures to ``report``."""

    @abstractmethod
    def headline(self, results: Results) -> pd.DataFrame:
        """The few numbers the command prints."""

    def config(self, results: Results, settings: ExperimentSettings) -> dict:
        """What ``config.json`` records besides the settings and the data."""
        return {}

    def answer(self, results: Results, verdicts: Sequence[Verdict]) -> str:
        """The experiment's question answered in one sentence: by default its first verdict's answer."""
        return verdicts[0].answer

    def write_report(self, results: Results, settings: ExperimentSettings) -> Outcome:
        """Judge ``results`` and write the report folder (``settings.out``, default ``reports/NAME``)."""
        report = Report(
            settings.out or f"reports/{self.name}",
            self.experiment_id,
            self.title,
            self.question,
            compute_s=results.compute_s,
            quick=settings.quick,
        )
        judged = self.verdicts(results)
        if settings.quick:
            judged = [replace(v, inconclusive=QUICK_REASON) for v in judged]
        report.verdicts(judged)
        self.sections(report, results, settings)
        report.write(settings, results.data, self.config(results, settings))
        return Outcome(
            self,
            report.out,
            self.headline(results),
            judged,
            report.figures,
            report.runtime_s,
            settings,
            results.data,
            self.answer(results, judged),
        )

    def run(self, settings: ExperimentSettings) -> Outcome:
        """Compute, judge and write the report."""
        return self.write_report(self.compute(settings), settings)


QUICK_REASON = "a --quick smoke run: its numbers are not a decision"
