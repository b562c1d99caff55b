"""The expert fit in a child process: its heap setting and its peak memory end with it.

The fit repeatedly allocates [block, D] and [D, D] float64 temporaries, which glibc's defaults page-fault in
again for every block (on the 2-core VM, one 4096-row block's products took 0.052 s with fresh pages, 0.023 s
with reused ones). The child therefore starts with :data:`moe.shared.heap.HEAP_ENV` in its environment (blocks up
to 1 GiB come from and return to the heap, whose top is never given back); the calling process -- the training
run -- loads the file the child writes and never holds the fit's peak memory (4 GB at 4096 pixels). Progress bars
and the project's log lines of the child appear as the parent's.

The child is a fresh interpreter running this module (``python -m moe.experts.isolated JOB``),
not a ``multiprocessing`` spawn, which would re-run the caller's main script -- a script without
an ``if __name__ == "__main__"`` guard would start the whole command again and wait on its own lock.

Over several ranks (:mod:`moe.data.ranks`) every rank starts its child; the children form a process
group of their own (gloo, through a TCP store that rank 0 opens on a free port) and split the fit by rows
(:mod:`moe.experts.fit`); rank 0's child writes the bundle. A rank's child that dies makes the others'
exchanges fail, so every rank gets an error, none a bundle.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import torch
from torch.distributed import PrefixStore, TCPStore

from moe.data import ranks
from moe.data.folder import SpectraFolder
from moe.experts.bundle import fit_bundle
from moe.experts.fit import FitConfig
from moe.shared.heap import HEAP_ENV

log = logging.getLogger(__name__)


class ExpertFitDied(RuntimeError):
    """The child process fitting the experts ended without a result (killed, out of memory)."""


def fit_in_child(folder: SpectraFolder, cfg: FitConfig, target: str | os.PathLike, progress: bool = True) -> None:
    """Fit the experts of ``folder`` with ``cfg`` in a child process and save the bundle at ``target``
    (collective over the ranks: each rank's child fits its share, rank 0's writes).

    An error of the fit (a too-small group, a shard that cannot be read) is raised here as it was raised
    there."""
    level = logging.getLogger("moe").getEffectiveLevel()
    rank, world = ranks.rank_world()
    store = None
    if world > 1:  # the children's own process group meets at a store rank 0 opens on a free port
        if rank == 0:
            store = TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False, timeout=ranks.PREPARE_TIMEOUT)
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        meet = ranks.broadcast((host, store.port if store is not None else 0, uuid.uuid4().hex))
    with tempfile.TemporaryDirectory(prefix="moe-expert-fit-") as tmp:
        job, outcome = Path(tmp) / "job.pkl", Path(tmp) / "outcome.pkl"
        group = (*meet, rank, world) if world > 1 else None
        job.write_bytes(pickle.dumps((folder, cfg, str(target), progress and rank == 0, level, str(outcome), group)))
        # the child imports this very moe package, installed or not
        root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=path, **HEAP_ENV)
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
    folder, cfg, target, progress, level, outcome, group = pickle.loads(job.read_bytes())
    moe_log = logging.getLogger("moe")
    moe_log.setLevel(level if group is None or group[3] == 0 else logging.ERROR)  # rank 0 speaks for all
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    moe_log.addHandler(handler)
    moe_log.propagate = False
    try:
        if group is not None:
            host, port, token, rank, world = group
            store = PrefixStore(token, TCPStore(host, port, is_master=False, timeout=ranks.PREPARE_TIMEOUT))
            torch.distributed.init_process_group(
                "gloo", store=store, rank=rank, world_size=world, timeout=ranks.PREPARE_TIMEOUT
            )
        bundle = fit_bundle(folder, cfg, progress)
        if ranks.rank_world()[0] == 0:
            bundle.save(Path(target))
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
