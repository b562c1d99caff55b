"""How an experiment's gate converges: val R^2 per epoch, wall seconds, test R^2, under several training settings.

    python benchmarks/gate_convergence.py [--n-train 20000] [--fusion phys_only] [--seeds 42 123 456] \\
        --run before:batch_size=256,lr=1e-3,decay_factor=1,patience=1000,max_epochs=120 \\
        --run rule: --run longer:patience=60,max_epochs=300  [--out DIR]

Each ``--run NAME:FIELD=VALUE,...`` overrides fields of :class:`moe.experiments.gates.GateTraining` (an empty
list: the experiments' default) and trains the gate once per seed on the dual tower's preparation of the
embedded data at the ``all`` size (the same expert fit and caches ``moe experiments all`` uses). Per run it
prints the epochs, the best and stopping epoch, val and test R^2 and the seconds; ``--out`` gets
``history.csv`` (run, seed, epoch, val R^2, learning rate) and ``runs.csv``. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd

from moe.experiments.common import ExperimentSettings
from moe.experiments.dual_tower import FAMILIES, METHODS
from moe.experiments.gates import GateTraining, prepare_families, test_rows, train_gate
from moe.experts.scores import r2
from moe.gates.quiet import quiet_lightning, quiet_repeated_trainers


def _training(spec: str) -> tuple[str, GateTraining]:
    name, _, overrides = spec.partition(":")
    types = {f.name: type(getattr(GateTraining(), f.name)) for f in fields(GateTraining)}
    values = {}
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        values[key] = types[key](float(value)) if types[key] is int else types[key](value)
    return name, replace(GateTraining(), **values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/synth")
    p.add_argument("--n-train", type=int, default=20_000)
    p.add_argument("--fusion", default="phys_only", help="a fusion of the dual tower's METHODS")
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--run", action="append", required=True, help="NAME:FIELD=VALUE,... (GateTraining fields)")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    quiet_lightning()
    quiet_repeated_trainers()
    family = next(f for _, fusion, f in METHODS if fusion == a.fusion)
    settings = ExperimentSettings(data=a.data, n_train=a.n_train, progress=False)
    dm = settings.datamodule()
    t = time.perf_counter()
    prepared = prepare_families(dm, FAMILIES, settings.fit_config(FAMILIES), progress=False)
    print(f"preparation {time.perf_counter() - t:.1f} s", flush=True)
    log_g = test_rows(dm)["log_g"].astype(np.float64)
    runs, history = [], []
    for spec in a.run:
        name, training = _training(spec)
        for seed in a.seeds:
            run = train_gate(dm, prepared[family], name, a.fusion, seed, training)
            row = {
                "run": name,
                "seed": seed,
                "test_r2": r2(log_g, run.pred),
                "val_r2": run.val_r2,
                "best_epoch": run.best_epoch,
                "epochs_run": run.epochs_run,
                "ended": run.ended,
                "seconds": run.seconds,
                "s_per_epoch": run.seconds / max(run.epochs_run, 1),
                "final_lr": run.lr_history[-1] if run.lr_history else np.nan,
                **{k: v for k, v in asdict(training).items()},
            }
            runs.append(row)
            history += [
                {"run": name, "seed": seed, "epoch": i + 1, "val_r2": v, "lr": lr}
                for i, (v, lr) in enumerate(zip(run.val_history, run.lr_history))
            ]
            print(
                f"{name:>12} seed {seed:>4}: test {row['test_r2']:.5f} val {row['val_r2']:.5f} best/run "
                f"{run.best_epoch}/{run.epochs_run} {run.seconds:6.1f} s ({row['s_per_epoch']:.2f} s/epoch) "
                f"{run.ended}; val R^2 every 5th epoch: " + " ".join(f"{v:.4f}" for v in run.val_history[4::5]),
                flush=True,
            )
            if a.out:
                a.out.mkdir(parents=True, exist_ok=True)
                pd.DataFrame(runs).to_csv(a.out / "runs.csv", index=False)
                pd.DataFrame(history).to_csv(a.out / "history.csv", index=False)
    print(json.dumps({"runs": runs}, default=float))


if __name__ == "__main__":
    main()
