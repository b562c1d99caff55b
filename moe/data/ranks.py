"""The ranks of a run as the one-off preparation sees them: who this process is, and a CPU group to talk on.

Lightning (``--trainer.strategy ddp``), torchrun and SLURM start one process per device and a
torch.distributed process group; the preparation splits its row passes over those ranks. Its own
messages are small objects and numpy sums on the CPU, so they go over a gloo group made once from the
default group, whatever that one's backend (NCCL on GPUs), with a timeout long enough for the ranks to
wait while another run holds the preparation lock (:func:`rank_lock`). A rank that dies closes its
sockets, so the others fail at their next exchange instead of waiting out the timeout.

Every function is collective where it says so (all ranks call it, in the same order). Without a process
group -- one process -- each is the one-process answer: rank 0 of 1, nothing sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from filelock import FileLock

PREPARE_TIMEOUT = timedelta(days=7)  # a rank may wait this long for the lock another run holds
_GROUPS: dict[int, dist.ProcessGroup] = {}  # per default group (id), its gloo twin


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def distributed() -> bool:
    """Whether this process is one of several ranks."""
    return rank_world()[1] > 1


def group() -> dist.ProcessGroup | None:
    """The preparation's gloo group over every rank (made on first use: collective); None in one process."""
    if not distributed():
        return None
    key = id(dist.group.WORLD)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)
    return _GROUPS[key]


def barrier() -> None:
    """Wait for every rank (collective)."""
    if distributed():
        dist.barrier(group=group())


def broadcast(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (collective; any picklable object)."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group())
    return box[0]


def all_reduce_sum(array: np.ndarray) -> np.ndarray:
    """``array`` summed over the ranks, in place (collective; a C-contiguous numpy array)."""
    if distributed():
        dist.all_reduce(torch.from_numpy(array), group=group())
    return array


class _Done:
    """The handle of an exchange that needed none (one process)."""

    def wait(self) -> bool:
        return True


def reduce_sum(array: np.ndarray, dst: int):
    """``array`` summed over the ranks into rank ``dst``'s ``array``, in place; the others' ``array`` is spent
    (collective, asynchronous: returns a handle whose ``wait()`` ends it; a C-contiguous numpy array)."""
    if not distributed():
        return _Done()
    return dist.reduce(torch.from_numpy(array), dst=dst, group=group(), async_op=True)


def broadcast_array(array: np.ndarray, src: int) -> np.ndarray:
    """``array`` of rank ``src`` copied into ``array`` on every rank, in place (collective)."""
    if distributed():
        dist.broadcast(torch.from_numpy(array), src=src, group=group())
    return array


@contextmanager
def rank_lock(path: Path) -> Iterator[None]:
    """The file lock at ``path`` for the whole group: rank 0 takes it and the others wait until it holds it;
    it is released once every rank has left the block (collective). In one process, the plain file lock.

    So two runs on one folder never prepare at once, and the ranks of one run prepare together."""
    if not distributed():
        with FileLock(str(path)):
            yield
        return
    rank = rank_world()[0]
    lock = FileLock(str(path)) if rank == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        barrier()
        yield
        barrier()
    finally:
        if lock is not None:
            lock.release()


def split_rows(sizes: list[int], world: int, align: list[int] | None = None) -> list[list[tuple[int, int, int]]]:
    """Rows of consecutive items of ``sizes`` rows each, cut into ``world`` nearly equal contiguous shares:
    per rank, ``(item, start, stop)`` pieces. Cuts inside an item fall on multiples of its ``align``
    (rows that must be built together); every row is in exactly one piece."""
    align = align or [1] * len(sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(offsets[-1])
    cuts = []
    for r in range(world + 1):
        p = (r * total) // world
        k = int(np.searchsorted(offsets, p, side="right") - 1)
        if k < len(sizes):  # snap down to the item's alignment
            p = int(offsets[k] + ((p - offsets[k]) // align[k]) * align[k])
        cuts.append(min(p, total))
    out: list[list[tuple[int, int, int]]] = []
    for r in range(world):
        lo, hi, pieces = cuts[r], cuts[r + 1], []
        for k in range(len(sizes)):
            a, b = max(lo, int(offsets[k])), min(hi, int(offsets[k + 1]))
            if a < b:
                pieces.append((k, a - int(offsets[k]), b - int(offsets[k])))
        out.append(pieces)
    return out


def concat_ranks(arrays: tuple[np.ndarray, ...], gather, device: torch.device | str = "cpu") -> tuple[np.ndarray, ...]:
    """Every rank's ``arrays`` (each [n_r, ...], n_r rows on rank r, the same n_r for all of one rank's) joined
    along the rows in rank order, on every rank (collective). ``gather`` is an all-gather of one tensor over
    the training process group (``LightningModule.all_gather``: [W, ...]), whatever its backend; the rows
    travel as float64 on ``device`` (integers below 2**53 exactly)."""
    flat = [a.reshape(len(a), int(np.prod(a.shape[1:]))) for a in arrays]
    table = torch.as_tensor(np.concatenate(flat, 1) if flat else np.zeros((0, 0)), dtype=torch.float64)
    counts = [int(c) for c in gather(torch.tensor(len(table), device=device)).reshape(-1).cpu()]
    if not max(counts):
        return tuple(arrays)
    padded = torch.zeros(max(counts), table.shape[1], dtype=torch.float64, device=device)
    padded[: len(table)] = table.to(device)
    every = gather(padded).reshape(len(counts), max(counts), table.shape[1]).cpu()
    joined = torch.cat([every[r, :n] for r, n in enumerate(counts)]).numpy()
    out, col = [], 0
    for a, f in zip(arrays, flat):
        out.append(joined[:, col : col + f.shape[1]].astype(a.dtype).reshape(-1, *a.shape[1:]))
        col += f.shape[1]
    return tuple(out)
