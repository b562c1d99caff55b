"""The heap setting of block loops (moe.shared.heap): reused pages inside, given back and left as glibc's own after."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest

from moe.data import row_cache
from moe.data.row_cache import RowCacheJob, ensure_row_caches, stale_reason
from moe.shared import heap

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the setting is glibc's"
)

# In a fresh process (the setting is process-wide): minor page faults of a loop that allocates and frees
# [2048, 4096] float64 blocks (64 MiB: above any threshold of glibc's dynamic rule), and the resident set.
PROBE = r"""
import json, resource
import numpy as np
from moe.shared.heap import block_heap

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

def loop(n=12):
    f = faults()
    for _ in range(n):
        a = np.ones((2048, 4096))
        a *= 2.0
        del a
    return faults() - f

out = {"outside": loop(), "rss_before": rss()}
with block_heap():
    out["inside"] = loop()
    with block_heap():
        pass
    out["after_inner"] = loop()
    out["rss_held"] = rss()
out["rss_after"] = rss()
out["after"] = loop()
print(json.dumps(out))
"""


@glibc_only
def test_block_heap_reuses_pages_inside_and_gives_them_back_after():
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    out = json.loads(run.stdout)
    # (fault counts depend on the kernel's page size for the mapping -- 4 KiB or transparent huge pages -- so
    # they are compared with each other)
    assert out["inside"] < out["outside"] / 5  # the first block's pages, then the same ones
    assert out["after_inner"] < out["outside"] / 5  # the inner one left the outer's setting alone
    assert out["rss_held"] - out["rss_before"] > 32 << 20  # the heap keeps the freed 64 MiB block meanwhile
    assert out["rss_after"] - out["rss_before"] < 16 << 20  # and gives it back on leaving
    assert out["after"] > out["outside"] / 2  # afterwards the process allocates as glibc does, not as inside


@glibc_only
def test_block_heap_leaves_a_process_started_with_heap_env_as_it_is():
    """The expert fit's child and the experiments start with HEAP_ENV for their whole life: a cache built there
    must not hand the rest of the process (an experiment's 1D-CNN) back to glibc's defaults."""
    env = dict(os.environ, **heap.HEAP_ENV)
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env)
    out = json.loads(run.stdout)
    assert out["after"] < out["inside"] + 1000 and out["outside"] < out["inside"] + 1000  # pages reused throughout


def test_block_heap_is_a_no_op_elsewhere(monkeypatch):
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    with heap.block_heap():
        assert heap._depth == 0


def test_row_caches_are_built_inside_block_heap(tmp_path, monkeypatch):
    active = []

    @contextmanager
    def recording():
        active.append(True)
        try:
            yield
        finally:
            active.pop()

    monkeypatch.setattr(row_cache, "block_heap", recording)
    inside = []

    def blocks(start, stop):
        for a in range(start, stop, 4):
            b = min(a + 4, stop)
            inside.append(bool(active))
            yield a, b, {"x": np.arange(a, b, dtype=np.float32)[:, None]}

    expected = {"n_rows": 10, "what": "probe"}
    (path,) = ensure_row_caches([RowCacheJob(tmp_path / "probe.h5", expected, blocks)])
    assert inside == [True, True, True] and not active
    assert stale_reason(path, expected) is None
