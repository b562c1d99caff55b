"""The whole pipeline at scale: wall time and peak RSS of each step, each in its own process.

    python benchmarks/pipeline_scale.py --rows 1000000 [--data data/bench1m] [--ranks 2] [--steps ...]

Steps, as a user runs them on a fresh folder (shards of 200k rows, val 5k, test 10k):

1. generate  -- ``moe.data.synth.write_dataset``;
2. experts   -- ``python -m moe.experts fit`` (one streamed pass, the alpha sweep, validation);
3. caches    -- pre-noised val/test copies and every split's per-row gate inputs (``moe.prepare.prepare``);
4. gate epoch -- ``train.py fit`` for one epoch (concat gate, validation, checkpoint);
5. predict   -- ``train.py predict`` of the test split from that checkpoint (CSV);
6. catalogue -- ``train.py predict --data.predict_path`` over one 200k-row training shard, then over
   all of them, taken as observations (HDF5 catalogues): peak RSS must not grow with the rows;
7. masked    -- every training shard as observations with masked pixels: a file whose flux and error are HDF5
   virtual datasets over the shard's (no copy of the spectra) and whose ``dataset/arrays/mask/value`` masks 5 %
   of the pixels of every ``--mask-every``-th star (default 50), and the Ca II 8542 block of 100 pixels of every
   tenth of those; predicted into FITS catalogues (imputation, OOD score and flags on every star), the first
   shard's (200k rows) and all of them (1M rows): FITS peak RSS must not grow with the rows. The imputation and
   the OOD score cost ~0.5 ms a star, ~1.8 ms with 5 % of its pixels masked (``catalogue_speed.py``).

``--ranks N`` adds the preparation over N ranks: ``torchrun --nproc-per-node N`` over
:func:`moe.prepare.prepare` on the same shards from a cold cache (``--data.cache_dir``-style: a second
cache folder ``<data>/ranks<N>`` for the pre-noised copies, row-check markers, gate-input caches and the
expert bundle, deleted first), after the 1-rank steps 2-3. With it, steps 2, 3 and the N-rank step run
with one BLAS / torch thread per process (``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1``)
so that 1 and N ranks compare; the N-rank experts and caches are then compared with the 1-rank ones.

Each step runs in a fresh process under a wrapper that reports its wall time and the peak RSS of
the step's processes (``RUSAGE_CHILDREN``: the largest of any one process of the tree -- the
torchrun agent, each rank, each rank's expert-fit child -- not their sum); later steps find what
earlier ones cached. ``--steps`` runs only the named steps (on a folder the earlier ones made).
``uptime`` is printed at the start and the end. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STEPS = ("generate", "experts", "caches", "ranks", "gate", "predict", "catalogue", "masked")

# runs argv[1:] and prints {"wall_s", "rss_mb"} of that child alone (a fresh wrapper per step)
WRAP = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(json.dumps({"rc": rc, "wall_s": time.perf_counter() - t,
                  "rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""

GENERATE = (
    "from moe.data.synth import SynthConfig, write_dataset; import sys; "
    "write_dataset(sys.argv[1], SynthConfig(int(sys.argv[2]), 5000, 10000, 200000, 4096, 0), progress=False)"
)
CACHES = (
    "import sys; from moe.data.folder import SpectraFolder; from moe.gates import GatedMoE; "
    "from moe.prepare import prepare; folder = SpectraFolder(sys.argv[1], synth=None); "
    "prepare(folder, GatedMoE('concat', n_pixels=folder.n_pixels).prepare_config(), progress=False)"
)

# preparation (experts + every cache) in a cache folder of its own, over the torchrun ranks when WORLD_SIZE > 1
PREPARE = (
    "import os, sys, dataclasses, torch; from moe.data.ranks import PREPARE_TIMEOUT; "
    "int(os.environ.get('WORLD_SIZE', 1)) > 1 and torch.distributed.init_process_group('gloo', timeout=PREPARE_TIMEOUT); "
    "from moe.data.folder import SpectraFolder; from moe.gates import GatedMoE; from moe.prepare import prepare; "
    "folder = SpectraFolder(sys.argv[1], synth=None, cache_dir=sys.argv[2]); "
    "cfg = GatedMoE('concat', n_pixels=folder.n_pixels).prepare_config(); "
    "prepare(folder, dataclasses.replace(cfg, experts_dir=sys.argv[2] + '/experts'), progress=False)"
)

# a shard as observations with masked pixels, without a copy of its spectra: flux and error are HDF5 virtual
# datasets over the shard's; every `every`-th star has 5 % of its pixels masked (`MASK_KEY`), every tenth of
# those also its Ca II 8542 block of 100 pixels (written block by block: memory flat in rows)
MASKED = r"""
import sys, h5py, numpy as np
from moe.data.shards import ERROR_KEY, FLUX_KEY, MASK_KEY, WAVE_KEY, read_params, write_shard
src, dst, every, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
params = read_params(src)
n = len(params)
with h5py.File(src, "r") as f:
    wave = f[WAVE_KEY][()]
write_shard(dst, wave, np.zeros((0, wave.size), np.float32), np.zeros((0, wave.size), np.float32),
            params.iloc[:0], labelled=False)
rng = np.random.default_rng(seed)
centre = int(np.argmin(np.abs(wave - 8542.09)))
with h5py.File(dst, "a") as g:
    for key in (FLUX_KEY, ERROR_KEY):
        del g[key]
        layout = h5py.VirtualLayout(shape=(n, wave.size), dtype=np.float32)
        layout[:] = h5py.VirtualSource(src, key, shape=(n, wave.size))
        g.create_virtual_dataset(key, layout)
    mask = g.create_dataset(MASK_KEY, shape=(n, wave.size), dtype=np.uint8)
    for s in range(0, n, 8192):
        e = min(s + 8192, n)
        block = np.zeros((e - s, wave.size), np.uint8)
        rows = np.arange(s, e)
        hit = rows % every == 0
        block[hit] = rng.random((int(hit.sum()), wave.size)) < 0.05
        block[hit & (rows % (10 * every) == 0), centre - 50 : centre + 50] = 1
        mask[s:e] = block
params.to_hdf(dst, key="dataset/params", mode="a", format="table")
"""


def step(name: str, cmd: list[str], env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", WRAP, *cmd], capture_output=True, text=True, cwd=ROOT, env=env)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise SystemExit(f"step {name} failed (exit {res['rc']}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    print(f"{name:<14}{res['wall_s']:>10.1f} s{res['rss_mb']:>10.0f} MB", flush=True)
    return res


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def compare(data: Path, other: Path) -> dict:
    """The experts and gate-input caches prepared in ``other`` against the 1-rank ones in ``data``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from prepare_ranks import compare_prepared

    return compare_prepared(data / "experts", other / "experts", data, other)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="training rows")
    ap.add_argument("--data", default=None, help="dataset folder (default data/bench<rows>)")
    ap.add_argument("--ranks", type=int, default=None, help="also prepare over this many torchrun ranks (cold cache)")
    ap.add_argument("--mask-every", type=int, default=50, help="step masked: every N-th star has masked pixels")
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="run only these steps")
    a = ap.parse_args()
    data = str(Path(a.data or f"data/bench{a.rows // 1000}k").resolve())
    logs = str(Path(data) / "logs")
    py = sys.executable
    train = [py, str(ROOT / "train.py")]
    common = [
        "--data.data_dir",
        data,
        "--data.synth",
        "null",
        "--trainer.default_root_dir",
        logs,
        "--trainer.enable_progress_bar",
        "false",
    ]
    # one BLAS / torch thread per process for the preparation when it is compared over ranks
    prep_env = dict(os.environ, **ONE_THREAD) if a.ranks else None
    fig = {"rows": a.rows, "ranks": a.ranks, "uptime_before": uptime()}
    print(f"pipeline at {a.rows} training rows x 4096 px in {data}; {fig['uptime_before']}")
    if a.ranks:
        print(f"preparation at one BLAS thread per process, 1 rank (experts + caches) and {a.ranks} ranks")
    print(f"{'step':<14}{'wall':>12}{'peak RSS':>13}", flush=True)
    if "generate" in a.steps:
        fig["generate"] = step("generate", [py, "-c", GENERATE, data, str(a.rows)])
    if "experts" in a.steps:
        fig["experts"] = step("experts", [py, "-m", "moe.experts", "fit", "--data", data], prep_env)
    if "caches" in a.steps:
        fig["caches"] = step("caches", [py, "-c", CACHES, data], prep_env)
    if a.ranks and "ranks" in a.steps:
        cache = Path(data) / f"ranks{a.ranks}"
        shutil.rmtree(cache, ignore_errors=True)  # cold: no experts, pre-noised copies, caches or markers
        run = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.ranks}", "--no-python"]
        fig[f"prepare_{a.ranks}"] = step(f"prepare {a.ranks}r", run + [py, "-c", PREPARE, data, str(cache)], prep_env)
        if "experts" in fig and "caches" in fig:
            one = fig["experts"]["wall_s"] + fig["caches"]["wall_s"]
            fig[f"prepare_ratio_{a.ranks}_over_1"] = round(fig[f"prepare_{a.ranks}"]["wall_s"] / one, 3)
            print(
                f"preparation: 1 rank {one:.1f} s, {a.ranks} ranks {fig[f'prepare_{a.ranks}']['wall_s']:.1f} s, "
                f"ratio {fig[f'prepare_ratio_{a.ranks}_over_1']:.3f}"
            )
        fig[f"same_answer_{a.ranks}"] = compare(Path(data), cache)
        print(f"{a.ranks} ranks against 1: {fig[f'same_answer_{a.ranks}']}", flush=True)
        shutil.rmtree(cache)  # ~4 GB at 1M rows; the later steps use the 1-rank caches
    if "gate" in a.steps:
        fig["gate_epoch"] = step("gate epoch", train + ["fit", *common, "--trainer.max_epochs", "1"])
    if "predict" in a.steps:
        out = str(Path(data) / "predictions.csv")
        fig["predict"] = step(
            "predict", train + ["predict", *common, "--ckpt_path", "best", "--predict_writer.output", out]
        )
    shards = sorted(str(p) for p in Path(data).glob("train_*/dataset.h5"))

    def catalogue(name: str, paths: list[str], output: str) -> None:
        fig[name] = step(
            name,
            train
            + [
                "predict",
                *common,
                "--ckpt_path",
                "best",
                "--data.predict_path",
                "[" + ", ".join(paths) + "]",
                "--predict_writer.output",
                str(Path(data) / output),
            ],
        )

    if "catalogue" in a.steps:
        for paths in (shards[:1], shards):
            catalogue(f"catalogue {len(paths)}", paths, f"catalogue{len(paths)}.h5")
    if "masked" in a.steps:
        masked = []
        for k, shard in enumerate(shards):
            masked.append(str(Path(data) / f"observed_masked_{k}" / "dataset.h5"))
            Path(masked[-1]).parent.mkdir(exist_ok=True)
            subprocess.run([py, "-c", MASKED, shard, masked[-1], str(a.mask_every), str(k)], check=True, cwd=ROOT)
        for paths in (masked[:1], masked):
            catalogue(f"masked {len(paths)}", paths, f"catalogue_masked{len(paths)}.fits")
    fig["uptime_after"] = uptime()
    print(fig["uptime_after"])
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
