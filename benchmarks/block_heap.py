"""The heap setting of the gate-input caches: built under glibc's defaults and under ``block_heap``, in one run.

    python benchmarks/block_heap.py [--data data/bench_ranks100k] [--repeat 2]

``ensure_row_caches`` builds its caches under :func:`moe.shared.heap.block_heap`. This rebuilds every gate-input
cache and pre-noised test copy of ``--data`` (a folder with shards; its experts are fitted first if it has none,
not timed) in a fresh process per setting (``run_in_child``, with glibc's own heap) -- with ``block_heap`` as
shipped, and with it replaced by a no-op -- alternating ``--repeat`` times, with one BLAS / torch thread, and prints
each build's wall time, user and system CPU, minor page faults and peak RSS, and the ratio of the best times. The
caches are the same either way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import time
from pathlib import Path

from moe.experiments.__main__ import run_in_child

ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def drop_caches(data: Path) -> None:
    """Remove the gate-input caches and the pre-noised test copies (the experts and the val copies stay)."""
    for pattern in ("*/gate_inputs_*.h5", "test_*/noisy_*.h5"):
        for path in data.glob(pattern):
            path.unlink()


def prepare_caches(data: str, setting: str) -> dict:
    """In a fresh process: what the folder's preparation builds, under ``block_heap`` or (``defaults``) a no-op in
    its place; the build's wall time and the process's CPU, minor page faults and peak RSS."""
    import moe.data.row_cache
    from moe.data.folder import SpectraFolder
    from moe.gates import GatedMoE
    from moe.prepare import prepare

    if setting == "defaults":
        moe.data.row_cache.block_heap = contextlib.nullcontext
    folder = SpectraFolder(data, synth=None)
    cfg = GatedMoE("concat", n_pixels=folder.n_pixels).prepare_config()
    t = time.perf_counter()
    prepare(folder, cfg, progress=False)
    wall = time.perf_counter() - t
    use = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall_s": round(wall, 2),
        "user_s": round(use.ru_utime, 2),
        "sys_s": round(use.ru_stime, 2),
        "minor_faults": use.ru_minflt,
        "peak_rss_gb": round(use.ru_maxrss / 2**20, 3),
    }


def build(data: Path, setting: str) -> dict:
    # the child's environment: one thread, and glibc's own heap (HEAP_ENV, run_in_child's default, would make
    # block_heap a no-op)
    return run_in_child(prepare_caches, str(data), setting, env=ONE_THREAD, what=f"the build under {setting}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/bench_ranks100k", help="a folder of shards (prepare_ranks.py makes one)")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    data = Path(a.data).resolve()
    if not (data / "synth.json").is_file() and not any(data.glob("train_*")):
        raise SystemExit(
            f"--data {a.data}: no shards there (python benchmarks/prepare_ranks.py --rows 100000 makes some)"
        )
    build(data, "block_heap")  # experts and caches as the folder needs them (not timed)
    best = {}
    for _ in range(a.repeat):
        for setting in ("defaults", "block_heap"):
            drop_caches(data)
            fig = build(data, setting)
            print(f"{setting:>10}: {json.dumps(fig)}", flush=True)
            best[setting] = min(best.get(setting, fig["wall_s"]), fig["wall_s"])
    print(f"block_heap / defaults: {best['block_heap'] / best['defaults']:.2f}x the time (best of {a.repeat})")


if __name__ == "__main__":
    main()
