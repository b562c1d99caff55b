"""The summary page of the series, ``reports/README.md``: one row per question, its hypothesis, verdict and answer.

Written by ``moe experiments all`` from the :class:`~moe.experiments.common.Outcome` of each experiment:
a row for each experiment's question (its answer, its report and figures linked), then a row for each
sub-question it decides -- the hypothesis as the research notes state it, the verdict with its
intervals and a one-sentence answer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from moe.experiments.common import QUICK_NOTE, SEED_RULE, Outcome, Verdict
from moe.shared.atomic import write_text


def _cell(text: str) -> str:
    """Text fit for a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _measured(v: Verdict) -> str:
    """The value with its bootstrap interval and, for trained gates, the seeds and their interval."""
    text = f"{v.value:+.4f}" + ("" if v.ci is None else f" [{v.ci[0]:+.4f}, {v.ci[1]:+.4f}]")
    if v.seeds is not None:
        seed_ci = v.seed_ci
        text += f"; {len(v.seeds)} seed(s)" + ("" if seed_ci is None else f" [{seed_ci[0]:+.4f}, {seed_ci[1]:+.4f}]")
    return text


def _rows(outcome: Outcome, root: Path, number: int) -> list[str]:
    folder = outcome.report.relative_to(root) if outcome.report.is_relative_to(root) else outcome.report
    exp = outcome.experiment
    figures = " · ".join(f"[{i}]({(folder / name).as_posix()})" for i, (name, _) in enumerate(outcome.figures, 1))
    results = [v.result for v in outcome.verdicts]
    tally = ", ".join(f"{results.count(r)} {r}" for r in ("PASS", "FAIL", "INCONCLUSIVE") if r in results)
    lines = [
        f"| **{number}** | **{exp.experiment_id}: {_cell(exp.question)}** ([report]({(folder / 'report.md').as_posix()}); "
        f"figures {figures}) | {_cell(exp.hypothesis)} | {tally} | {len(outcome.settings.seeds)} seed(s); runtime "
        f"{outcome.runtime_s:.0f} s | {_cell(outcome.answer)} |"
    ]
    for i, v in enumerate(outcome.verdicts, 1):
        lines.append(
            f"| {number}.{i} | {_cell(v.question)} | {_cell(v.hypothesis) or '–'} | **{v.result}** "
            f"({v.op} {v.threshold:g}) | {_measured(v)} | {_cell(v.answer)} |"
        )
    return lines


def write_summary(outcomes: Sequence[Outcome], root: Path | str) -> Path:
    """Write ``root/README.md`` for the experiments' ``outcomes`` (run into ``root``); return its path."""
    root = Path(root)
    settings = outcomes[0].settings
    data = outcomes[0].data.description
    total = sum(o.runtime_s for o in outcomes)
    rows = [
        "| # | question | hypothesis (research notes) | verdict (rule) | value [bootstrap 95% CI]; seeds [95% "
        "interval of their mean] | answer |",
        "|---|---|---|---|---|---|",
    ]
    for number, outcome in enumerate(outcomes, 1):
        rows += _rows(outcome, root, number)
    seeds = "; ".join(f"{o.experiment.name} {' '.join(map(str, o.settings.seeds))}" for o in outcomes)
    head = [
        "# The research series: what it found",
        "",
        f"Written by `moe experiments all` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"data `{data['data_dir']}` ({data['n_train']} train / {data['n_val']} val / {data['n_test']} test, "
        f"{data['n_pixels']} px, noise_level {data['noise_level']}; fingerprint `{outcomes[0].data.fingerprint_hash}`); "
        f"{settings.n_train or 'all'} training spectra used; seeds: {seeds}; gates at most {settings.epochs} epochs "
        f"(each stops on convergence); runtime {total / 60:.1f} min "
        f"({', '.join(f'{o.experiment.name} {o.runtime_s:.0f} s' for o in outcomes)}).",
        "",
    ]
    if settings.quick:
        head += [f"> **{QUICK_NOTE}**", ""]
    head += [
        "Each experiment's question (bold row), then each sub-question it decides: the hypothesis as the research "
        "notes (`shared/seeds/000`–`004`) state it, quoted in their words where they give a rule; the verdict "
        "computed from the numbers; the measured value with its paired bootstrap 95% CI over test stars; for "
        "differences between trained gates, the number of seeds and the 95% interval of their mean.",
        "",
        f"**The decision rule.** A verdict with an interval decides only off its threshold: PASS when the rule "
        f"holds at both ends of the interval, FAIL at neither, INCONCLUSIVE otherwise. {SEED_RULE}",
        "",
        *rows,
        "",
        "## Figures",
        "",
    ]
    for outcome in outcomes:
        folder = outcome.report.relative_to(root) if outcome.report.is_relative_to(root) else outcome.report
        head.append(f"**{outcome.experiment.experiment_id}** ({outcome.experiment.title}):")
        head.append("")
        head += [
            f"{i}. [{name}]({(folder / name).as_posix()}) — {_cell(caption)}"
            for i, (name, caption) in enumerate(outcome.figures, 1)
        ]
        head.append("")
    path = root / "README.md"
    write_text(path, "\n".join(head), "the summary page")
    return path
