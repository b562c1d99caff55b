"""The expert fit in a child process: its heap setting and its peak memory end with it.

The fit repeatedly allocates [block, D] and [D, D] float64 temporaries; the child process keeps
freed blocks in its heap (:func:`moe.experts.heap.retain_freed_blocks`, a process-wide glibc
setting that cannot be undone) and writes the bundle; the calling process -- the training run --
then loads the file, keeps glibc's own defaults and never holds the fit's peak memory (4 GB at
4096 pixels). Progress bars and the project's log lines of the child appear as the parent's.

The child is a fresh interpreter running this module (``python -m moe.experts.isolated JOB``),
not a ``multiprocessing`` spawn, which would re-run the caller's main script -- a script without
an ``if __name__ == "__main__"`` guard would start the whole command again and wait on its own lock.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

from moe.data.folder import SpectraFolder
from moe.experts.bundle import fit_bundle
from moe.experts.fit import FitConfig
from moe.experts.heap import retain_freed_blocks

log = logging.getLogger(__name__)


class ExpertFitDied(RuntimeError):
    """The child process fitting the experts ended without a result (killed, out of memory)."""


def fit_in_child(folder: SpectraFolder, cfg: FitConfig, target: str | os.PathLike, progress: bool = True) -> None:
    """Fit the experts of ``folder`` with ``cfg`` in a child process and save the bundle at ``target``.

    An error of the fit (a too-small group, a shard that cannot be read) is raised here as it was raised
    there."""
    level = logging.getLogger("moe").getEffectiveLevel()
    with tempfile.TemporaryDirectory(prefix="moe-expert-fit-") as tmp:
        job, outcome = Path(tmp) / "job.pkl", Path(tmp) / "outcome.pkl"
        job.write_bytes(pickle.dumps((folder, cfg, str(target), progress, level, str(outcome))))
        # the child imports this very moe package, installed or not
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        child = subprocess.Popen([sys.executable, "-m", "moe.experts.isolated", str(job)], env=env)
        try:
            code = child.wait()
        finally:
            if child.poll() is None:
                child.terminate()
                child.wait()
        if outcome.is_file():
            error = pickle.loads(outcome.read_bytes())
            if error is not None:
                raise error
            return
    raise ExpertFitDied(
        f"the process fitting the experts for {target} ended without a result (exit code {code}; out of memory?)"
    )


def _run(job: Path) -> None:
    folder, cfg, target, progress, level, outcome = pickle.loads(job.read_bytes())
    moe_log = logging.getLogger("moe")
    moe_log.setLevel(level)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    moe_log.addHandler(handler)
    moe_log.propagate = False
    retain_freed_blocks()
    try:
        fit_bundle(folder, cfg, progress).save(Path(target))
        error = None
    except Exception as exc:  # handed to the parent, which raises it
        error = exc
    try:
        data = pickle.dumps(error)
    except Exception:
        data = pickle.dumps(RuntimeError(f"{type(error).__name__}: {error}"))
    Path(outcome).write_bytes(data)


if __name__ == "__main__":
    _run(Path(sys.argv[1]))
