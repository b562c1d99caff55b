"""The preparation split over ranks: the same ``moe fit`` with 1 and with N CPU ranks, side by side in one run.

    python benchmarks/prepare_ranks.py --rows 100000 [--ranks 1 2] [--data data/bench_ranks100k] [--timeline]
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
Each run prints its wall time and its CPU time (user + system of every process it started, by role: rank r,
expert fit r), read from ``/proc`` every 0.1 s (Linux): the CPU time of N ranks over N is the wall time they
would take perfectly packed on N cores, and N x wall - CPU the core-seconds they left idle; ``--timeline``
prints the CPU of each role per 2 s of the run with the idle cores, i.e. where the cores wait. Runs are taken
in the order given (default 1 then 2). ``uptime`` is printed before and after: on a machine others are using,
the figures measure the load too. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
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


TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> dict[int, float]:
    """User + system CPU seconds so far of ``pid`` and each of its live descendants (Linux ``/proc``), by pid."""
    parent, cpu = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended meanwhile
            continue
        parent[int(stat.parent.name)] = int(fields[1])
        cpu[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / TICK
    tree, grew = {pid}, True
    while grew:
        more = {p for p, pp in parent.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    return {p: cpu[p] for p in tree if p in cpu}


def run_metered(cmd: list[str], env: dict, every: float = 0.1) -> tuple[subprocess.CompletedProcess, list]:
    """Run ``cmd``; also return the CPU seconds (user + system) its process tree had used by role -- the ranks and
    their expert-fit children, which their parents do not all wait for, so ``RUSAGE_CHILDREN`` would miss them --
    read from ``/proc`` every ``every`` s: ``[(seconds since the start, {role: CPU s so far})]`` (a process's last
    ``every`` s before it exits are not counted)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, float] = {}
    role: dict[int, str] = {}
    samples: list[tuple[float, dict[str, float]]] = []

    def meter() -> None:
        while proc.poll() is None:
            for pid, cpu in tree_cpu(proc.pid).items():
                seen[pid] = max(seen.get(pid, 0.0), cpu)
                if pid not in role:
                    role[pid] = role_of(pid)
            so_far: dict[str, float] = {}
            for pid, cpu in seen.items():
                so_far[role[pid]] = so_far.get(role[pid], 0.0) + cpu
            samples.append((time.perf_counter() - t0, so_far))
            time.sleep(every)

    thread = threading.Thread(target=meter, daemon=True)
    thread.start()
    out, err = proc.communicate()
    thread.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), samples or [(0.0, {})]


def timeline(samples: list, cores: int, bucket: float = 2.0) -> str:
    """The CPU seconds of each role per ``bucket`` s of the run and the core-seconds left idle (``cores`` x bucket
    minus their sum): where the run leaves a core waiting."""
    roles = sorted({r for _, so_far in samples for r in so_far})
    lines = [f"{'s':>6} " + " ".join(f"{r:>13}" for r in roles) + "   idle"]
    prev, i, end = {}, 0, bucket
    while i < len(samples):
        while i + 1 < len(samples) and samples[i + 1][0] <= end:
            i += 1
        now = samples[i][1]
        used = {r: now.get(r, 0.0) - prev.get(r, 0.0) for r in roles}
        width = min(end, samples[-1][0]) - (end - bucket)  # the last bucket ends with the run
        lines.append(
            f"{end:6.0f} "
            + " ".join(f"{used[r]:13.2f}" for r in roles)
            + f"   {cores * width - sum(used.values()):5.2f}"
        )
        prev, i, end = now, i + 1, end + bucket
    return "\n".join(lines)


def role_of(pid: int) -> str:
    """What a process of the run is: ``rank <r>``, ``expert fit <r>`` (the rank's child), ``torchrun`` or ``other``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = dict(
            item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item
        )
    except OSError:
        return "other"
    rank = environ.get(b"LOCAL_RANK", environ.get(b"RANK", b"0")).decode()
    if b"torch.distributed.run" in argv:
        return "torchrun"
    if b"moe.experts.isolated" in argv:
        return f"expert fit {rank}"
    return f"rank {rank}" if b"moe.main" in argv or b"-c" in argv else "other"


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
    ap.add_argument("--timeline", action="store_true", help="print each run's CPU per role per 2 s and the idle cores")
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
        run, samples = run_metered(command(a.step, data, ranks), env)
        wall, by_role = time.perf_counter() - t, {r: round(v, 1) for r, v in samples[-1][1].items()}
        cpu = sum(by_role.values())
        if run.returncode != 0:
            raise SystemExit(f"{ranks} ranks failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
        fig[f"wall_s_{ranks}"], fig[f"cpu_s_{ranks}"] = round(wall, 1), round(cpu, 1)
        fig[f"cpu_s_by_process_{ranks}"] = dict(sorted(by_role.items()))
        print(
            f"{ranks} rank(s): {wall:8.1f} s, {cpu:6.1f} CPU-s (user + sys, every process)   ({uptime()})", flush=True
        )
        print("    CPU-s by process: " + ", ".join(f"{k} {v}" for k, v in sorted(by_role.items())), flush=True)
        fig[f"idle_core_s_{ranks}"] = round(ranks * wall - cpu, 1)
        if a.timeline:
            print(timeline(samples, ranks), flush=True)
        keep_aside(data, ranks)
    base = a.ranks[0]
    for ranks in a.ranks[1:]:
        fig[f"ratio_{ranks}_over_{base}"] = round(fig[f"wall_s_{ranks}"] / fig[f"wall_s_{base}"], 3)
        # the ratio were the N-rank run's CPU perfectly packed on its N cores (none idle)
        fig[f"floor_{ranks}_over_{base}"] = round(fig[f"cpu_s_{ranks}"] / ranks / fig[f"wall_s_{base}"], 3)
        fig[f"same_answer_{ranks}"] = compare(data, base, ranks)
        print(
            f"{ranks} / {base} ranks: {fig[f'ratio_{ranks}_over_{base}']:.3f} (perfectly packed: "
            f"{fig[f'floor_{ranks}_over_{base}']:.3f}); {fig[f'same_answer_{ranks}']}"
        )
    fig["uptime_after"] = uptime()
    print(fig["uptime_after"])
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
