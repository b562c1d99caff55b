"""glibc's heap setting for loops over [rows, pixels] blocks: each block's memory reused, not page-faulted in again.

glibc serves every allocation above its mmap threshold (at most 32 MiB by its own dynamic rule) with a fresh
``mmap`` and unmaps it on free, so a loop that allocates and frees [1024, 4096] float64 blocks page-faults every
block in again -- on a virtual machine as costly as the arithmetic (the gate-input caches of 100k rows: 2.4 M minor
faults and 7.3 s of system time in 37 s; `benchmarks/README.md`). Two ways to keep them in the heap:

- :data:`HEAP_ENV`, the environment of a process started for such work (the expert fit's child, an experiment's
  process): blocks up to 1 GiB come from and return to the heap, whose top is never given back -- for the whole
  life of a process that ends with its work;
- :func:`block_heap`, around such a loop in a process that goes on afterwards (the caches and the catalogue of a
  training run): the same setting while inside; on leaving, the free memory is given back to the system and the
  thresholds are left where glibc's dynamic rule ends once a block of 32 MiB or more has been freed (mmap above
  32 MiB, trim above 64 MiB), the state such a loop leaves glibc in anyway. In a process started with its own
  thresholds (:data:`HEAP_ENV`, or glibc's tunables) it changes nothing.

Elsewhere than glibc both mean nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# glibc malloc tunables of a process started for block work: serve blocks up to 1 GiB from the heap, keep its top
HEAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
INSIDE = {
    M_MMAP_THRESHOLD: int(HEAP_ENV["MALLOC_MMAP_THRESHOLD_"]),
    M_TRIM_THRESHOLD: int(HEAP_ENV["MALLOC_TRIM_THRESHOLD_"]),
}
AFTER = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20}  # where glibc's dynamic rule ends

_lock = threading.Lock()
_depth = 0


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library's symbols when it is glibc and the process did not start with its own thresholds (the
    expert fit's child, an experiment's process: :data:`HEAP_ENV`, kept for their whole life), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if any(name in os.environ for name in (*HEAP_ENV, "GLIBC_TUNABLES")):
        return None
    return ctypes.CDLL(None)


def _set(libc: ctypes.CDLL, values: dict[int, int]) -> None:
    for param, value in values.items():
        libc.mallopt(param, ctypes.c_int(value))


@contextmanager
def block_heap() -> Iterator[None]:
    """Within: freed blocks up to 1 GiB stay in the heap for the next ones. On leaving the outermost one: the
    free memory is given back (``malloc_trim``) and the thresholds are set as glibc's dynamic rule ends. Nests;
    process-wide (every thread allocates under it meanwhile)."""
    global _depth
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _set(libc, INSIDE)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(libc, AFTER)
                libc.malloc_trim(ctypes.c_size_t(0))
