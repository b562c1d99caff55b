"""The whole pipeline at scale: wall time and peak RSS of each step, each in its own process.

    python benchmarks/pipeline_scale.py --rows 1000000 [--data data/bench1m]

Steps, as a user runs them on a fresh folder (shards of 200k rows, val 5k, test 10k):

1. generate  -- ``moe.data.synth.write_dataset``;
2. experts   -- ``python -m moe.experts fit`` (one streamed pass, the alpha sweep, validation);
3. caches    -- pre-noised val/test copies and every split's per-row gate inputs (``moe.prepare.prepare``);
4. gate epoch -- ``train.py fit`` for one epoch (concat gate, validation, checkpoint);
5. predict   -- ``train.py predict`` of the test split from that checkpoint (CSV);
6. catalogue -- ``train.py predict --data.predict_path`` over one 200k-row training shard, then over
   all of them, taken as observations (HDF5 catalogues): peak RSS must not grow with the rows;
7. masked    -- a copy of the first training shard as observations with 5 % of each star's pixels masked
   (``dataset/arrays/mask/value``) and every tenth star's Ca II 8542 block of 100 pixels NaN, predicted
   into a FITS catalogue (imputation, OOD score and flags on every star).

Each step runs in a fresh process under a wrapper that reports its wall time and the
step's peak RSS; later steps find what earlier ones cached. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

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

# a copy of a shard as observations with masked pixels, written block by block (memory flat in rows)
MASKED = r"""
import sys, h5py, numpy as np
from moe.data.shards import ERROR_KEY, FLUX_KEY, MASK_KEY, WAVE_KEY, read_params, write_shard
src, dst = sys.argv[1], sys.argv[2]
params = read_params(src)
n = len(params)
with h5py.File(src, "r") as f:
    wave = f[WAVE_KEY][()]
write_shard(dst, wave, np.zeros((0, wave.size), np.float32), np.zeros((0, wave.size), np.float32),
            params.iloc[:0], labelled=False)
rng = np.random.default_rng(0)
centre = int(np.argmin(np.abs(wave - 8542.09)))
with h5py.File(src, "r") as f, h5py.File(dst, "a") as g:
    for key in (FLUX_KEY, ERROR_KEY):
        del g[key]
        g.create_dataset(key, shape=(n, wave.size), dtype=np.float32)
    g.create_dataset(MASK_KEY, shape=(n, wave.size), dtype=np.uint8)
    for s in range(0, n, 8192):
        e = min(s + 8192, n)
        flux = f[FLUX_KEY][s:e]
        flux[::10, centre - 50 : centre + 50] = np.nan
        g[FLUX_KEY][s:e] = flux
        g[ERROR_KEY][s:e] = f[ERROR_KEY][s:e]
        g[MASK_KEY][s:e] = rng.random((e - s, wave.size)) < 0.05
params.to_hdf(dst, key="dataset/params", mode="a", format="table")
"""


def step(name: str, cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", WRAP, *cmd], capture_output=True, text=True, cwd=ROOT)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise SystemExit(f"step {name} failed (exit {res['rc']}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    print(f"{name:<14}{res['wall_s']:>10.1f} s{res['rss_mb']:>10.0f} MB", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="training rows")
    ap.add_argument("--data", default=None, help="dataset folder (default data/bench<rows>)")
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
    print(f"pipeline at {a.rows} training rows x 4096 px in {data}")
    print(f"{'step':<14}{'wall':>12}{'peak RSS':>13}")
    fig = {"rows": a.rows}
    fig["generate"] = step("generate", [py, "-c", GENERATE, data, str(a.rows)])
    fig["experts"] = step("experts", [py, "-m", "moe.experts", "fit", "--data", data])
    fig["caches"] = step("caches", [py, "-c", CACHES, data])
    fig["gate_epoch"] = step("gate epoch", train + ["fit", *common, "--trainer.max_epochs", "1"])
    fig["predict"] = step(
        "predict",
        train
        + ["predict", *common, "--ckpt_path", "best", "--predict_writer.output", str(Path(data) / "predictions.csv")],
    )
    shards = sorted(str(p) for p in Path(data).glob("train_*/dataset.h5"))
    for name, paths in (("catalogue 1", shards[:1]), (f"catalogue {len(shards)}", shards)):
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
                str(Path(data) / f"catalogue{len(paths)}.h5"),
            ],
        )
    masked = str(Path(data) / "observed_masked" / "dataset.h5")
    Path(masked).parent.mkdir(exist_ok=True)
    subprocess.run([py, "-c", MASKED, shards[0], masked], check=True, cwd=ROOT)
    fig["masked"] = step(
        "masked",
        train
        + [
            "predict",
            *common,
            "--ckpt_path",
            "best",
            "--data.predict_path",
            masked,
            "--predict_writer.output",
            str(Path(data) / "catalogue_masked.fits"),
        ],
    )
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
