"""One gate-training epoch against its I/O floor, and against the step that reads whole spectra.

    python benchmarks/gate_epoch.py --rows 100000 [--data data/bench100k] [--device cuda]

Measured in one run, on the same training rows, after every file has been read once (so
each part finds them in the page cache):

- floor: a bare loop that reads the rows' flux and error with h5py in the stream's blocks
  (2048 rows) and adds ``error * randn`` (on ``--device``);
- reference step: the step as it was first written -- spectra streamed through the
  DataModule's loader, noise on the full flux, features from all D pixels (dense windows,
  a sort of every error row), experts on the noisy flux, gate forward/backward, Adam --
  timed on ``--reference-rows`` rows (default 20 000) and reported as spectra/s;
- ours: one epoch of ``pl.Trainer.fit`` (concat gate, the DataModule's default loader
  settings) over the per-row gate-input caches with fresh noise per batch -- the step
  ``train.py fit`` runs;
- the one-off cost of the caches (pre-noised val/test copies and every split's gate inputs,
  built into an empty folder) is timed apart.

Target: floor / ours >= 1. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import h5py
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from moe.data.datamodule import SpectraDataModule
from moe.data.noise import add_noise
from moe.data.synth import SynthConfig, write_dataset
from moe.gates import GatedMoE
from moe.prepare import attach_inputs, prepare


def warm(paths) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def floor_epoch(dm: SpectraDataModule, device: torch.device) -> float:
    """Seconds to read every training row's flux and error in the stream's blocks and add error * randn."""
    shards = dm.train_set
    t = time.perf_counter()
    for block in shards.blocks(0, shards.n_rows, dm.block_rows):
        with h5py.File(shards.infos[block.shard].path, "r") as f:
            flux = torch.from_numpy(f["dataset/arrays/flux/value"][block.start : block.stop]).to(device)
            error = torch.from_numpy(f["dataset/arrays/error/value"][block.start : block.stop]).to(device)
        noisy = flux + error * torch.randn(flux.shape, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    del noisy
    return time.perf_counter() - t


def reference_epoch(dm: SpectraDataModule, model: GatedMoE, rows: int, device: torch.device) -> tuple[float, int]:
    """(seconds, rows) of the first-written step over spectra: dense features from the noisy flux."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from reference_gate import reference_inputs

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loader = torch.utils.data.DataLoader(dm.stream("train"), batch_size=None, num_workers=dm.num_workers)
    seen, t = 0, time.perf_counter()
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        flux = add_noise(batch["flux"], batch["error"], dm.noise_level)
        ref = reference_inputs(model.mixture, flux, batch["error"])
        mixture = model.mixture
        gate = mixture.gate(mixture.phys_scaler(ref["phys"]), mixture.qual_scaler(ref["quality"]))
        loss = F.mse_loss((gate.weights * ref["experts"]).sum(-1), batch["log_g"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(batch["row"])
        if seen >= rows:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, seen


class EpochTimer(pl.Callback):
    def on_train_epoch_start(self, trainer, module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        if module.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def our_epoch(dm: SpectraDataModule, model: GatedMoE, device: torch.device) -> float:
    timer = EpochTimer()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=dm)
    return timer.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000, help="training rows of the epoch")
    ap.add_argument("--reference-rows", type=int, default=20_000, help="rows the reference step is timed on")
    ap.add_argument("--data", default="data/bench100k", help="dataset folder (generated if absent)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    device = torch.device(a.device)
    write_dataset(a.data, SynthConfig(max(a.rows, 100_000), 2000, 2000, 20_000, 4096, 0))
    pl.seed_everything(0, verbose=False)

    dm = SpectraDataModule(a.data, max_train_rows=a.rows, synth=None)
    model = GatedMoE("concat", n_pixels=dm.n_pixels, noise_level=dm.noise_level)
    model.load_prepared(prepare(dm, model.prepare_config()))
    with tempfile.TemporaryDirectory(dir=a.data) as tmp:
        fresh = SpectraDataModule(a.data, max_train_rows=a.rows, synth=None, cache_dir=tmp)
        t = time.perf_counter()
        attach_inputs(fresh, *model.mixture.projection(), model.mixture.physics.pixels)
        prepare_s = time.perf_counter() - t
    warm(dm.train_set.paths)
    warm(p for paths in dm.inputs.values() for p in paths.values())

    floor_s = floor_epoch(dm, device)
    ref_s, ref_rows = reference_epoch(dm, model.to(device), min(a.reference_rows, a.rows), device)
    ours_s = our_epoch(dm, model, device)
    n = dm.train_set.n_rows
    fig = {
        "rows": n,
        "device": a.device,
        "num_workers": dm.num_workers,
        "batch_size": dm.batch_size,
        "prepare_s": prepare_s,
        "floor_s": floor_s,
        "floor_spec_s": n / floor_s,
        "reference_rows": ref_rows,
        "reference_s": ref_s,
        "reference_spec_s": ref_rows / ref_s,
        "ours_s": ours_s,
        "ours_spec_s": n / ours_s,
        "floor_over_ours": floor_s / ours_s,
        "ours_over_reference_speed": (n / ours_s) / (ref_rows / ref_s),
        "window_pixels": model.mixture.physics.n_window_pixels,
        "projections": model.mixture.projection()[0].shape[0],
    }
    fig = {k: round(v, 3) if isinstance(v, float) else v for k, v in fig.items()}

    print(
        f"gate epoch, concat gate over {model.mixture.experts.n_experts} experts: {n} rows x {dm.n_pixels} px, "
        f"batch {dm.batch_size}, {dm.num_workers} loader workers, {a.device}"
    )
    print(f"{'part':<52}{'seconds':>9}{'spectra/s':>11}")
    print(f"{'floor: h5py flux + error, + error * randn':<52}{floor_s:>9.2f}{fig['floor_spec_s']:>11.0f}")
    print(
        f"{'reference step (dense features), ' + str(ref_rows) + ' rows':<52}{ref_s:>9.2f}{fig['reference_spec_s']:>11.0f}"
    )
    print(f"{'ours: pl.Trainer epoch on cached gate inputs':<52}{ours_s:>9.2f}{fig['ours_spec_s']:>11.0f}")
    print(
        f"{'once: pre-noised val/test + gate-input caches':<52}{prepare_s:>9.2f}{(n + dm.val_set.n_rows + dm.test_set.n_rows) / prepare_s:>11.0f}"
    )
    print(
        f"ratios: floor / ours = {fig['floor_over_ours']:.2f} (target >= 1); ours / reference speed = "
        f"{fig['ours_over_reference_speed']:.1f}x; per row the step reads {fig['window_pixels']} window pixels "
        f"and {fig['projections']} projections instead of {dm.n_pixels} pixels"
    )
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
