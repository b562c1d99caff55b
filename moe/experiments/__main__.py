"""``moe experiments NAME [--data DIR] [--n-train N] [--seeds 42 123 456] [--out reports/NAME]``.

``--min-samples N`` and ``--fallback global`` set how the Ridge experts of every experiment treat
small groups, as in ``moe experts``. A setting an experiment cannot work with (too few training
spectra, a value out of range) stops it with one line naming the flag (:class:`SettingsError`).

Every gate trains until it converges (early stopping on val R^2; ``--epochs`` is only a safety
cap). The dual tower trains each gate with three seeds unless ``--seeds`` says otherwise (the
others use one); a verdict on a difference between gates must hold against both the test stars'
bootstrap interval and the spread between seeds.

``all`` runs the four in order into ``--out`` (default ``reports/``) and writes the summary page
``README.md`` there, at a default size that finishes in under 30 minutes on 2 CPU cores
(20k training spectra, CNN up to 20 epochs); ``--quick`` is a smoke run of a few minutes whose
verdicts are not decisions; ``--n-train`` scales it up to the full 1M (the Ridge experts
stream; in-memory models -- LightGBM, CNN, the leakage audit -- are capped by
``--max-memory-rows``). Each experiment runs in a process of its own (:func:`run_in_child`), so what one
leaves in the heap never adds to the next one's peak (the peak RSS of ``all`` is its largest experiment's), and
its allocator keeps large blocks in the heap as the expert fit's does: the 1D-CNN's batches are not page-faulted
in afresh at every step.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import resource
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pandas as pd
from jsonargparse import Namespace

from moe.experiments import EXPERIMENTS, experiment
from moe.experiments.common import ExperimentSettings, Outcome
from moe.experiments.gates import MAX_EPOCHS
from moe.experiments.summary import write_summary
from moe.gates.quiet import quiet_lightning, quiet_repeated_trainers
from moe.shared.arguments import ToolParser, run_tool
from moe.shared.heap import HEAP_ENV

ALL_DEFAULTS = {"n_train": 20_000, "cnn_epochs": 20}
# a smoke run: a few thousand spectra, two seeds, short gate runs; its verdicts are not decisions
QUICK = {"n_train": 3000, "max_memory_rows": 3000, "seeds": (1, 2), "epochs": 8, "cnn_epochs": 2}
ISOLATE = True  # each experiment in its own process (tests that patch an experiment set it False)


def _parser() -> ToolParser:
    """The options, each declared by its :class:`ExperimentSettings` field (flag, type with range, default); the
    sized ones default to None here so that ``all`` / ``--quick`` can fill what is not given."""
    s = ExperimentSettings
    d = s()
    p = ToolParser(prog="moe experiments", description=__doc__.split("\n")[0])
    p.add_argument("name", choices=(*EXPERIMENTS, "all"), help="the experiment to run ('all': the four in order)")
    p.add_option(s, "data", help="dataset folder (the default is generated on first use)")
    p.add_option(s, "n_train", help="training spectra to use (default: all; 'all': 20000)")
    p.add_option(
        s,
        "seeds",
        default=None,
        help="one run per seed (gate training, in-memory models, snr-oracle's test noise); results are averaged "
        "(default: dual-tower 42 123 456, the others 42)",
    )
    p.add_option(s, "out", help="report folder (default reports/NAME; for 'all' the parent folder)")
    p.add_option(
        s,
        "noise_level",
        help="multiplier of the 1-sigma error for the noise on every split (fresh train draws, pre-noised val/test)",
    )
    p.add_option(
        s,
        "max_memory_rows",
        default=None,
        help=f"cap for models that need rows in memory (default {d.max_memory_rows})",
    )
    p.add_option(
        s,
        "epochs",
        default=None,
        help=f"safety cap on gate training epochs (dual-tower; default {MAX_EPOCHS}): each run stops on convergence, "
        "once val R^2 stalls",
    )
    p.add_option(
        s,
        "cnn_epochs",
        default=None,
        help=f"1D-CNN epochs (ceiling; default {d.cnn_epochs}, 'all': {ALL_DEFAULTS['cnn_epochs']}; 0 skips)",
    )
    p.add_option(s, "lgbm_device", help="LightGBM device_type (cpu, gpu, cuda)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK['n_train']} training spectra, seeds {' '.join(map(str, QUICK['seeds']))}, at most "
        f"{QUICK['epochs']} gate epochs; the reports say its verdicts are not decisions (other flags override)",
    )
    p.add_option(
        s,
        "min_samples",
        help="fewest training rows a Ridge expert needs: fewer stop the expert fit before any solve, naming the "
        "short groups (a physical or SNR group may take the global expert instead: --fallback global)",
    )
    p.add_option(
        s,
        "fallback",
        help="'global': a group with fewer than --min-samples training rows uses the global expert",
    )
    return p


def _settings(a: Namespace) -> ExperimentSettings:
    """The shared settings of the run (the seeds are set per experiment): the flags, over the defaults of
    ``all`` or ``--quick``."""
    sized = {**(ALL_DEFAULTS if a.name == "all" else {}), **(QUICK if a.quick else {})}
    given = {
        "n_train": a.n_train,
        "epochs": a.epochs,
        "cnn_epochs": a.cnn_epochs,
        "max_memory_rows": a.max_memory_rows,
    }
    chosen = {k: v if v is not None else sized.get(k) for k, v in given.items()}
    return ExperimentSettings(
        data=a.data,
        n_train=chosen["n_train"],
        noise_level=a.noise_level,
        max_memory_rows=chosen["max_memory_rows"]
        if chosen["max_memory_rows"] is not None
        else ExperimentSettings.max_memory_rows,
        epochs=chosen["epochs"] if chosen["epochs"] is not None else MAX_EPOCHS,
        cnn_epochs=chosen["cnn_epochs"] if chosen["cnn_epochs"] is not None else ExperimentSettings.cnn_epochs,
        lgbm_device=a.lgbm_device,
        min_samples=a.min_samples,
        fallback=a.fallback,
        quick=a.quick,
    )


def peak_rss_gb() -> float:
    """The largest RSS of this process or of any process it waited for (experiments, expert fits) so far, in GB
    (the budget's second figure; ``ru_maxrss`` is in kB on Linux)."""
    own, children = (resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return max(own, children) / 1e6


@contextmanager
def _environment(extra: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``extra`` inside the block (for a child started there), restored after."""
    before = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


class ChildDied(RuntimeError):
    """The process running an experiment ended without a result (killed, out of memory)."""


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when the thread that started it ends


def _end_with_parent(parent: int) -> None:
    """In a child of :func:`run_in_child`: have the kernel end it (SIGTERM) when ``parent`` ends, however that ends
    (a ``kill``, out of memory), so a stopped run leaves no experiment running on (Linux; elsewhere nothing). The
    child is started from the parent's main thread, which lives as long as the parent."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (AttributeError, OSError, TypeError):  # no prctl: not Linux
        return
    if os.getppid() != parent:  # the parent ended before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def run_in_child(fn: Callable, *args, env: dict[str, str] = HEAP_ENV, what: str = "the job"):
    """``fn(*args)`` in a fresh (spawned) process, its result (or its exception) handed back: the memory it used
    goes back to the system when it returns. The child starts with the heap setting of the expert fit's child
    (:data:`HEAP_ENV`): under glibc's defaults a large block (over its threshold, at most 32 MiB) is a fresh
    ``mmap``, page-faulted in again at each use, and the ceiling's 1D-CNN took 260 s for a bin instead of 89 s.
    ``env``: what the child's environment adds to this process's (``{}``: nothing, glibc's defaults; a
    benchmark's comparison, ``benchmarks/experiment_heap.py``). ``fn`` and the arguments must pickle. A child that
    dies without a result raises :class:`ChildDied` naming ``what`` it ran; a parent that ends takes the child with it
    (:func:`_end_with_parent`)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, context, initializer=_end_with_parent, initargs=(os.getpid(),)) as pool:
        with _environment(env):
            future = pool.submit(fn, *args)  # starts the child, which inherits this environment
        try:
            return future.result()
        except BrokenProcessPool:
            raise ChildDied(
                f"the process running {what} ended without a result (killed; out of memory? peak RSS so far "
                f"{peak_rss_gb():.2f} GB)"
            ) from None


def _setup() -> None:
    """What every process of a run sets up: log lines as messages, Lightning's lines a user cannot act on off."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_lightning()
    quiet_repeated_trainers()
    pd.set_option("display.width", 160)


def _run(name: str, settings: ExperimentSettings, child: bool = False) -> Outcome:
    """One experiment (in a child: set up as the parent is first)."""
    if child:
        _setup()
    return experiment(name).run(settings)


def _print(outcome: Outcome, seconds: float) -> None:
    print(
        f"\n== {outcome.experiment.name}: {outcome.report}/report.md ({seconds:.0f} s, "
        f"peak RSS so far {peak_rss_gb():.2f} GB)"
    )
    print(outcome.headline.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for v in outcome.verdicts:
        print(f"  [{v.result}] {v.question} {v.value:+.4f} {v.op} {v.threshold:g} -> {v.decision}")


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    _setup()
    base = _settings(a)
    names = EXPERIMENTS if a.name == "all" else (a.name,)
    root = Path(a.out or "reports")
    outcomes = []
    for name in names:
        exp = experiment(name)
        seeds = a.seeds or (QUICK["seeds"] if a.quick else exp.default_seeds)
        out = root / name if (a.name == "all" or a.out is None) else root
        t = time.time()
        settings = replace(base, out=str(out), seeds=tuple(seeds))
        if ISOLATE:
            outcomes.append(run_in_child(_run, name, settings, True, what=f"experiment {name}"))
        else:
            outcomes.append(_run(name, settings))
        _print(outcomes[-1], time.time() - t)
    if a.name == "all":
        print(f"\n== summary: {write_summary(outcomes, root)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main, "moe experiments"))
