"""The preparation split over ranks: the same ``moe fit`` with 1 and with N CPU ranks, side by side in one run.

    python benchmarks/prepare_ranks.py --rows 100000 [--ranks 1 2] [--data data/bench_ranks100k]
    python benchmarks/prepare_ranks.py --rows 1000000 --step prepare   # the 1M pipeline's preparation step

Every measured command starts on a fresh folder -- the shards as generated, no experts, no
pre-noised copies, no gate-input caches, no row-check markers -- with one BLAS / torch thread per
process (``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1``), so N ranks use N cores:

- ``--step fit`` (default): ``moe fit --config dual_tower --trainer.max_epochs 1 --trainer.accelerator cpu
  --trainer.devices N [--trainer.strategy ddp]`` -- preparation, one epoch, validation, checkpoint;
- ``--step prepare``: the pipeline's preparation step alone (``benchmarks/pipeline_scale.py``'s experts +
  caches), ``torchrun --nproc-per-node N`` over :func:`moe.prepare.prepare`.

After each run the folder's experts are kept aside, and at the end the N-rank experts are compared with
the 1-rank ones (largest relative weight difference, alphas equal) and so are the gate-input caches.
Runs are taken in the order given (default 1 then 2). ``uptime`` is printed before and after: on a
machine others are using, the figures measure the load too. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from moe.experts.bundle import ExpertBundle

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
GENERATE = (
    "from moe.data.synth import SynthConfig, write_dataset; import sys; "
    "write_dataset(sys.argv[1], SynthConfig(int(sys.argv[2]), 5000, 10000, int(sys.argv[3]), 4096, 0), progress=False)"
)
PREPARE = (
    "import os, sys, torch; from moe.data.ranks import PREPARE_TIMEOUT; "
    "int(os.environ.get('WORLD_SIZE', 1)) > 1 and torch.distributed.init_process_group('gloo', timeout=PREPARE_TIMEOUT); "
    "from moe.data.folder import SpectraFolder; from moe.gates import GatedMoE; "
    "from moe.prepare import prepare; folder = SpectraFolder(sys.argv[1], synth=None); "
    "prepare(folder, GatedMoE('concat', n_pixels=folder.n_pixels).prepare_config(), progress=False)"
)
CACHES = ("experts", "noisy_*.h5", "gate_inputs_*.h5", "row_check_*", ".*", "logs")


def fresh(data: Path) -> None:
    """Remove every cache the preparation writes into the folder (the shards stay)."""
    for pattern in CACHES:
        for path in list(data.glob(pattern)) + list(data.glob(f"*/{pattern}")):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def command(step: str, data: Path, ranks: int) -> list[str]:
    if step == "prepare":
        run = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={ranks}",
            "--no-python",
        ]
        return run + [sys.executable, "-c", PREPARE, str(data)]
    moe = [sys.executable, "-m", "moe.main"]
    ddp = ["--trainer.strategy", "ddp"] if ranks > 1 else []
    return moe + [
        "fit",
        "--config",
        "dual_tower",
        "--trainer.max_epochs",
        "1",
        "--data.data_dir",
        str(data),
        "--data.synth",
        "null",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        str(ranks),
        *ddp,
        "--trainer.default_root_dir",
        str(data / "logs"),
        "--trainer.enable_progress_bar",
        "false",
    ]


def compare(data: Path, one: int, other: int) -> dict:
    """The ``other``-rank experts and gate-input caches against the ``one``-rank ones."""
    return compare_prepared(
        data / f"experts.{one}", data / f"experts.{other}", data / f"caches.{one}", data / f"caches.{other}"
    )


def compare_prepared(experts_a: Path, experts_b: Path, caches_a: Path, caches_b: Path) -> dict:
    """The expert bundle in ``experts_b`` and the gate-input caches under ``caches_b`` (one folder per split) against
    those of ``experts_a`` / ``caches_a``: the largest relative weight difference, whether every alpha is the same,
    how many caches had a twin and their largest relative difference (first 20000 rows)."""
    a, b = (ExpertBundle.load(next(folder.glob("experts-*.pt"))) for folder in (experts_a, experts_b))
    out = {"weight_rel": 0.0, "alpha_equal": True, "caches": 0, "cache_rel": 0.0}
    for label, fams in a.fits.items():
        for fam, fa in fams.items():
            wa, wb = fa.weight, b.fits[label][fam].weight
            out["weight_rel"] = max(out["weight_rel"], float(np.abs(wa - wb).max() / np.abs(wa).max()))
            out["alpha_equal"] &= bool(np.array_equal(fa.alpha, b.fits[label][fam].alpha))
    for path in sorted(caches_a.glob("*/gate_inputs_*.h5")):
        prefix, _, rows = path.name.rsplit("_", 2)  # the map key in the middle differs with the experts' last bits
        twin = next((caches_b / path.parent.name).glob(f"{prefix}_*_{rows}"), None)
        if twin is None:
            continue
        out["caches"] += 1
        with h5py.File(path, "r") as f, h5py.File(twin, "r") as g:
            for name in f:
                x, y = f[name][:20000].astype(np.float64), g[name][:20000].astype(np.float64)
                scale = max(float(np.abs(x).max()), 1e-30)
                out["cache_rel"] = max(out["cache_rel"], float(np.abs(x - y).max() / scale))
    return out


def keep_aside(data: Path, ranks: int) -> None:
    """Move this run's experts and gate-input caches aside (compared at the end)."""
    shutil.rmtree(data / f"experts.{ranks}", ignore_errors=True)
    shutil.rmtree(data / f"caches.{ranks}", ignore_errors=True)
    (data / "experts").rename(data / f"experts.{ranks}")
    for path in data.glob("*/gate_inputs_*.h5"):
        (data / f"caches.{ranks}" / path.parent.name).mkdir(parents=True, exist_ok=True)
        path.rename(data / f"caches.{ranks}" / path.parent.name / path.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000, help="training rows")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="rank counts, measured in this order")
    ap.add_argument("--step", choices=("fit", "prepare"), default="fit")
    ap.add_argument("--data", default=None, help="dataset folder (default data/bench_ranks<rows/1000>k)")
    a = ap.parse_args()
    data = Path(a.data or f"data/bench_ranks{a.rows // 1000}k").resolve()
    if not (data / "synth.json").is_file():
        shard = min(200_000, max(a.rows // 10, 1000))
        print(f"generating {a.rows} rows in {data}", flush=True)
        subprocess.run([sys.executable, "-c", GENERATE, str(data), str(a.rows), str(shard)], check=True, cwd=ROOT)
    env = dict(os.environ, **ONE_THREAD)
    fig = {"rows": a.rows, "step": a.step, "cores": os.cpu_count(), "uptime_before": uptime()}
    print(f"{a.step} on {a.rows} training rows x 4096 px, fresh folder each run; {fig['uptime_before']}")
    for ranks in a.ranks:
        fresh(data)
        t = time.perf_counter()
        run = subprocess.run(command(a.step, data, ranks), env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if run.returncode != 0:
            raise SystemExit(f"{ranks} ranks failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
        fig[f"wall_s_{ranks}"] = round(wall, 1)
        print(f"{ranks} rank(s): {wall:8.1f} s   ({uptime()})", flush=True)
        keep_aside(data, ranks)
    base = a.ranks[0]
    for ranks in a.ranks[1:]:
        fig[f"ratio_{ranks}_over_{base}"] = round(fig[f"wall_s_{ranks}"] / fig[f"wall_s_{base}"], 3)
        fig[f"same_answer_{ranks}"] = compare(data, base, ranks)
        print(f"{ranks} / {base} ranks: {fig[f'ratio_{ranks}_over_{base}']:.3f}; {fig[f'same_answer_{ranks}']}")
    fig["uptime_after"] = uptime()
    print(fig["uptime_after"])
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
