"""The LightningCLI of ``train.py``: fit / validate / test / predict of ``GatedMoE`` on ``SpectraDataModule``.

- links the datamodule's pixel count, noise level and expert cache folder into the model;
- before the trainer runs, the preparation step (:func:`moe.prepare.prepare`) builds or loads
  the experts, feature windows, scalers and gate-input caches and hands them to the model
  (validate/test/predict with a checkpoint take them from the checkpoint instead);
- a ModelCheckpoint on ``val/r2`` (max, plus ``last.ckpt``) and the per-star catalogue of ``predict``
  (``--data.predict_path``: any shards, labels optional; CSV or HDF5);
- ``--test_after_fit true`` tests the best checkpoint right after ``fit``;
- ``test``/``predict``/``validate`` print or write their results, and ``--ckpt_path best``
  works in a fresh process (the best checkpoint of the newest run under the log folder).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import torch
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities import rank_zero_info

from moe.data.datamodule import SpectraDataModule
from moe.data.shards import check_grid, read_wave
from moe.experts.bundle import ExpertsMismatchError, default_dir
from moe.gates.callbacks import CatalogueWriter
from moe.gates.checkpoints import read_checkpoint
from moe.gates.module import GatedMoE, summary_table
from moe.gates.quiet import quiet_lightning
from moe.prepare import attach_inputs, prepare


def experts_dir(data_dir: str) -> str:
    return str(default_dir(data_dir))


def resolve_best_checkpoint(root: str | os.PathLike) -> str:
    """The best checkpoint (per its ModelCheckpoint state) of the newest run that saved a ``last.ckpt``."""
    candidates = glob.glob(os.path.join(str(root), "**", "checkpoints", "last.ckpt"), recursive=True)
    if not candidates:
        raise FileNotFoundError(f"--ckpt_path best: no run with checkpoints/last.ckpt under {root}")
    last = max(candidates, key=os.path.getmtime)
    state = read_checkpoint(last)
    for key, cb in state.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and cb.get("best_model_path"):
            return cb["best_model_path"]
    raise FileNotFoundError(f"{last} records no best checkpoint")


class MoECLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.n_pixels", "model.n_pixels", apply_on="instantiate")
        parser.link_arguments("data.noise_level", "model.noise_level", apply_on="parse")
        parser.link_arguments("data.data_dir", "model.experts_dir", compute_fn=experts_dir, apply_on="parse")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/r2",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:02d}-val_r2{val/r2:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(CatalogueWriter, "predict_writer")
        parser.add_argument("--test_after_fit", type=bool, default=False, help="test the best checkpoint after fit")

    def _instantiate_trainer(self, config, callbacks):
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, RichProgressBar) for c in callbacks
        ):
            callbacks.append(RichProgressBar())
        return super()._instantiate_trainer(config, callbacks)

    # ---- prepared artefacts, before the trainer runs -------------------------------------------
    def _prepare(self) -> None:
        """Hand the model what is not learned: from the preparation step, or -- for validate/test/predict
        with a checkpoint -- from the checkpoint itself, with the gate-input caches built for its experts."""
        cfg = self.config_init[self.subcommand]
        ckpt = cfg.get("ckpt_path")
        if self.subcommand == "predict":  # the catalogue is written batch by batch: keep nothing in memory
            cfg["return_predictions"] = False
        if self.subcommand == "fit" or ckpt is None:
            self.model.load_prepared(prepare(self.datamodule, self.model.prepare_config()))
            if self.subcommand == "fit" and ckpt is not None and Path(ckpt).is_file():
                self._check_resumed_experts(ckpt)
            return
        if ckpt == "best":
            ckpt = resolve_best_checkpoint(self.trainer.default_root_dir)
            cfg["ckpt_path"] = ckpt
            rank_zero_info(f"--ckpt_path best -> {ckpt}")
        state = read_checkpoint(ckpt)
        stored, here = state.get("moe_data_fingerprint"), self.datamodule.fingerprint_hash()
        if stored and stored != here:
            raise ExpertsMismatchError(
                f"{ckpt}: trained on data {stored}, but --data holds data {here}: "
                "its experts do not belong to this data"
            )
        self.model.load_state_dict(state["state_dict"])
        self.model.data_fingerprint = stored or here
        if self.subcommand == "predict":
            for path in self.datamodule.predict_set().paths:
                check_grid(path, read_wave(path), self.model.physics.wave.cpu().numpy(), f"the checkpoint's ({ckpt})")
        splits = ("val",) if self.subcommand == "validate" else ("test",)
        attach_inputs(self.datamodule, *self.model.input_map(), self.model.physics.pixels, splits)

    def _check_resumed_experts(self, ckpt: str) -> None:
        """A run resumed from ``ckpt`` must find the same experts the checkpoint was trained with: the
        cached gate inputs were built for the prepared ones."""
        saved = read_checkpoint(ckpt)["state_dict"]
        for name, buf in (("experts.weight", self.model.experts.weight), ("experts.bias", self.model.experts.bias)):
            if name in saved and not torch.equal(saved[name], buf.detach().cpu()):
                raise ExpertsMismatchError(
                    f"{ckpt}: its experts differ from those prepared for this run (other --model.expert_* "
                    "settings or a refitted bundle); resume with the settings it was trained with"
                )

    before_fit = before_validate = before_test = before_predict = _prepare

    def after_test(self) -> None:
        self._print_table()

    def after_fit(self) -> None:
        if self.config_init["fit"].get("test_after_fit") and not self.trainer.fast_dev_run:
            best = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)
            self._print_table()

    def _print_table(self) -> None:
        if self.trainer.is_global_zero:
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("test/")}
            print(
                f"\ntest: fusion {self.model.hparams.fusion}, experts {self.model.family} "
                f"({self.model.experts.n_experts}), noise_level {self.datamodule.noise_level}"
            )
            print(summary_table(metrics))


def cli_main(args: list[str] | None = None) -> MoECLI:
    """Entry point of ``train.py`` (``args`` for tests; ``None`` reads sys.argv)."""
    quiet_lightning()
    torch.set_float32_matmul_precision("high")
    return MoECLI(
        GatedMoE,
        SpectraDataModule,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"max_epochs": 8, "log_every_n_steps": 20},
        args=args,
    )
