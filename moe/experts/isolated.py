"""The expert fit in a child process: its heap setting and its peak memory end with it.

The fit repeatedly allocates [block, D] and [D, D] float64 temporaries; the child process keeps
freed blocks in its heap (:func:`moe.experts.heap.retain_freed_blocks`, a process-wide glibc
setting that cannot be undone) and writes the bundle; the calling process -- the training run --
then loads the file, keeps glibc's own defaults and never holds the fit's peak memory (4 GB at
4096 pixels). Progress bars and the project's log lines of the child appear as the parent's.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from pathlib import Path

from moe.data.folder import SpectraFolder
from moe.experts.fit import FitConfig

log = logging.getLogger(__name__)


class ExpertFitDied(RuntimeError):
    """The child process fitting the experts ended without a result (killed, out of memory)."""


def fit_in_child(folder: SpectraFolder, cfg: FitConfig, target: str | os.PathLike, progress: bool = True) -> None:
    """Fit the experts of ``folder`` with ``cfg`` in a child process and save the bundle at ``target``.

    An error of the fit (a too-small group, a shard that cannot be read) is raised here as it was raised
    there."""
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    level = logging.getLogger("moe").getEffectiveLevel()
    child = ctx.Process(
        target=_fit_and_save, args=(folder, cfg, str(target), progress, send, level), name="moe-expert-fit"
    )
    child.start()
    send.close()
    try:
        outcome = receive.recv()
    except EOFError:
        outcome = ExpertFitDied(f"the process fitting the experts for {target} ended without a result")
    finally:
        child.join(timeout=None if child.exitcode is not None else 60)
        if child.is_alive():
            child.terminate()
    if outcome is not None:
        if isinstance(outcome, ExpertFitDied) and child.exitcode:
            outcome = ExpertFitDied(f"{outcome} (exit code {child.exitcode}; out of memory?)")
        raise outcome


def _fit_and_save(folder: SpectraFolder, cfg: FitConfig, target: str, progress: bool, send, level: int) -> None:
    from moe.experts.bundle import fit_bundle
    from moe.experts.heap import retain_freed_blocks

    moe_log = logging.getLogger("moe")
    moe_log.setLevel(level)
    if not moe_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        moe_log.addHandler(handler)
        moe_log.propagate = False
    retain_freed_blocks()
    try:
        fit_bundle(folder, cfg, progress).save(Path(target))
        send.send(None)
    except BaseException as exc:  # handed to the parent, which raises it
        try:
            send.send(exc)
        except Exception:
            send.send(RuntimeError(f"{type(exc).__name__}: {exc}"))
    finally:
        send.close()
