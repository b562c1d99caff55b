"""Keep freed large blocks in the heap while the experts are fitted (glibc only).

glibc serves every allocation above ``M_MMAP_THRESHOLD`` (at most 32 MiB by its own dynamic
rule) with a fresh ``mmap`` and unmaps it on free, so each [4096, 4096] temporary of the
fit -- a block's float64 rows, a float32 copy of a Gram for a factorisation -- is
page-faulted in again. Where page faults are expensive (virtual machines) this costs about
as much as the arithmetic: measured on the 2-core VM, the SNR of one 4096-row block took
0.052 s with fresh pages and 0.023 s with reused ones. :func:`retained_heap` raises the
thresholds for the duration of the fit, then returns the freed memory to the system
(``malloc_trim``) and leaves the thresholds where glibc's own dynamic rule takes them in a
long-running process: a 32 MiB mmap threshold and twice that as the trim threshold. (glibc
offers no way to read the thresholds or to resume its dynamic rule once ``mallopt`` has been
called, so these are the values that rule would have reached after the first large free;
the 128 KiB starting values would send every later allocation above 128 KiB -- a training
batch -- to a fresh ``mmap``.) Elsewhere it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import platform
from collections.abc import Iterator

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
DYNAMIC_MMAP_MAX = 32 * 1024 * 1024  # glibc's ceiling of its dynamic mmap threshold (64-bit)
DYNAMIC_TRIM = 2 * DYNAMIC_MMAP_MAX  # the trim threshold its dynamic rule sets alongside
RETAIN_BYTES = 1 << 30  # blocks up to 1 GiB come from (and return to) the heap
RETAIN_TRIM = 2**31 - 1  # never give the heap's top back while retaining


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _set(libc: ctypes.CDLL, mmap_threshold: int, trim_threshold: int) -> bool:
    return bool(
        libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold))
        and libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold))
    )


@contextlib.contextmanager
def retained_heap() -> Iterator[bool]:
    """Reuse freed large blocks inside the ``with`` (yields whether the setting took effect)."""
    libc = _glibc()
    active = libc is not None and _set(libc, RETAIN_BYTES, RETAIN_TRIM)
    if libc is not None and not active:
        log.debug("mallopt refused the heap thresholds; allocating as usual")
    try:
        yield active
    finally:
        if active:
            _set(libc, DYNAMIC_MMAP_MAX, DYNAMIC_TRIM)
            libc.malloc_trim(0)
