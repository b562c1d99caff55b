"""The LightningCLI behind ``moe fit|validate|test|predict``: ``GatedMoE`` on ``SpectraDataModule``.

- links the datamodule's pixel count, noise level and expert cache folder into the model;
- before the trainer runs, the preparation step (:func:`moe.prepare.prepare`) builds or loads
  the experts, feature windows, scalers and gate-input caches and hands them to the model
  (validate/test/predict with a checkpoint take them from the checkpoint instead);
- each gate variant is one run folder, ``<default_root_dir>/lightning_logs/<fusion>-<experts>/version_N``
  (TensorBoard events with clean hyperparameters and ``hp_metric`` = best ``val/r2``, ``checkpoints/``);
  ``--ckpt_path best|last`` resolve within the newest version of the command's own run, ``fit --ckpt_path
  last`` continues that version where it stopped, and evaluation of a run's checkpoint logs into the
  run's own folder (an evaluation of a file from elsewhere logs nothing);
- a ModelCheckpoint on ``val/r2`` (max, plus ``last.ckpt``) and the per-star catalogue of ``predict``
  (``--data.predict_path``: any shards, labels optional, masked pixels honoured; CSV, HDF5 or FITS; the
  training set's low-rank model and OOD threshold, :mod:`moe.prepare.reference`, built once per dataset);
- ``--test_after_fit true`` tests the best checkpoint right after ``fit``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info

from moe.data.datamodule import SpectraDataModule
from moe.data.shards import check_grid, read_wave
from moe.experts.bundle import ExpertsMismatchError, default_dir
from moe.gates.callbacks import CatalogueWriter, RunSummary
from moe.gates.checkpoints import (
    RUNS_DIR,
    CheckpointError,
    check_state_fits,
    find_checkpoint,
    read_checkpoint,
    run_name,
    version_of,
)
from moe.gates.module import GatedMoE, default_family, summary_table
from moe.gates.quiet import quiet_lightning
from moe.prepare import attach_inputs, prepare
from moe.prepare.reference import load_or_build

DESCRIPTION = (
    "Train, evaluate and apply a gated mixture of frozen Ridge experts that estimates log g +- sigma "
    "from noisy PFS MR spectra. Options come from --config (a shipped config by name, e.g. quickstart, "
    "dual_tower, or a YAML file) and --model.* / --data.* / --trainer.* flags."
)

SUBCOMMANDS = {
    "fit": (
        "Prepare (experts, feature windows and scalers, per-row gate-input caches; once per dataset and settings) "
        "and train a gate over the frozen experts; checkpoints and TensorBoard events go to "
        "lightning_logs/<fusion>-<experts>/version_N. --ckpt_path last continues that run where it stopped; "
        "--test_after_fit true prints the test table of the best epoch."
    ),
    "validate": "Validation metrics of a checkpoint (--ckpt_path best|last|FILE) on the pre-noised validation split.",
    "test": (
        "The test table of a checkpoint (--ckpt_path best|last|FILE): R2, gate entropy and sigma calibration "
        "per SNR bin, rho against the oracle."
    ),
    "predict": (
        "A catalogue, log g +- sigma per star with gate weights and each expert's prediction, of the test split "
        "or of any shards (--data.predict_path, labels optional); CSV or HDF5 (--predict_writer.output)."
    ),
}


def experts_dir(data_dir: str) -> str:
    return str(default_dir(data_dir))


class MoECLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.n_pixels", "model.n_pixels", apply_on="instantiate")
        parser.link_arguments("data.noise_level", "model.noise_level", compute_fn=float, apply_on="parse")
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

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the model settings with a checkpoint's own; a checkpoint of another gate variant
        than the command asks for is refused first, naming both (it would otherwise silently win)."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and Path(ckpt).is_file():
            model = self.config[sub]["model"]
            self._check_same_variant(
                ckpt, self._checkpoint(ckpt), model["fusion"], model.get("experts"), model.get("variance_head", True)
            )
        super()._parse_ckpt_path()

    def _checkpoint(self, path: str) -> dict:
        """The contents of checkpoint ``path``, read once per command (the parse check and the preparation
        both need them)."""
        states = self.__dict__.setdefault("_checkpoint_states", {})
        if path not in states:
            states[path] = read_checkpoint(path)
        return states[path]

    def _instantiate_trainer(self, config, callbacks):
        root = config.get("default_root_dir") or os.getcwd()
        run = run_name(self.model.hparams.fusion, self.model.family)
        version = self._resolve_checkpoint(root, run)
        if config.get("logger") in (None, True):
            # fit: a new version of the run (or the resumed one); evaluation: the checkpoint's own version
            keep = self.subcommand == "fit" or version is not None
            config["logger"] = (
                TensorBoardLogger(Path(root) / RUNS_DIR, name=run, version=version, default_hp_metric=False)
                if keep
                else False
            )
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, RichProgressBar) for c in callbacks
        ):
            callbacks.append(RichProgressBar())
        callbacks.append(RunSummary())
        save_config = self.save_config_callback
        if self.subcommand != "fit":  # the run folder keeps the config it was trained with
            self.save_config_callback = None
        try:
            return super()._instantiate_trainer(config, callbacks)
        finally:
            self.save_config_callback = save_config

    def _resolve_checkpoint(self, root: str, run: str) -> int | None:
        """Turn ``--ckpt_path best|last`` into the file of this run (said in one line), check that a given
        file exists, and return the run version the checkpoint belongs to (None: not one of this run's)."""
        cfg = self.config_init[self.subcommand]
        ckpt = cfg.get("ckpt_path")
        if ckpt is None:
            return None
        if ckpt in ("best", "last"):
            if self.subcommand == "fit" and ckpt == "best":
                raise CheckpointError("--ckpt_path best: fit continues a run from 'last' (or a checkpoint file)")
            path = find_checkpoint(root, run, ckpt)
            rank_zero_info(f"--ckpt_path {ckpt} -> {path}")
            cfg["ckpt_path"] = ckpt = str(path)
        elif not Path(ckpt).is_file():
            raise CheckpointError(f"--ckpt_path {ckpt}: no such checkpoint file (or use best / last)")
        return version_of(ckpt, root, run)

    # ---- prepared artefacts, before the trainer runs -------------------------------------------
    def _prepare(self) -> None:
        """Hand the model what is not learned: from the preparation step, or -- for validate/test/predict
        with a checkpoint -- from the checkpoint itself, with the gate-input caches built for its experts."""
        cfg = self.config_init[self.subcommand]
        ckpt = cfg.get("ckpt_path")
        if self.subcommand == "predict":  # the catalogue is written batch by batch: keep nothing in memory
            cfg["return_predictions"] = False
        if self.subcommand == "fit" or ckpt is None:
            state = self._fitting_checkpoint(ckpt) if ckpt is not None else None  # refused before any work
            self.model.load_prepared(prepare(self.datamodule, self.model.prepare_config()))
            if state is not None:
                self._check_resumed_experts(ckpt, state)
            self._catalogue_reference()
            return
        state = self._fitting_checkpoint(ckpt)
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
        # predict reads the spectra themselves (masked pixels, the OOD score): no gate-input caches
        splits = {"validate": ("val",), "test": ("test",)}.get(self.subcommand, ())
        attach_inputs(self.datamodule, *self.model.input_map(), self.model.physics.pixels, splits)
        self._catalogue_reference()

    def _catalogue_reference(self) -> None:
        """For ``predict``: what the catalogue compares stars with (:mod:`moe.prepare.reference`), cached beside
        the expert bundles."""
        if self.subcommand == "predict":
            cache = self.model.prepare_config().experts_dir or default_dir(self.datamodule.data_dir)
            self.model.catalogue_reference = load_or_build(self.datamodule, cache)

    def _fitting_checkpoint(self, ckpt: str) -> dict:
        """The contents of ``ckpt`` once they are known to fit this model: the same gate variant, and (after
        filling in what an earlier moe's state lacks) tensors of this model's shapes; else one error naming it."""
        state = self._checkpoint(ckpt)
        self._check_same_variant(ckpt, state)
        self.model.upgrade_state(state["state_dict"])
        check_state_fits(self.model, state["state_dict"], ckpt)
        return state

    def _check_same_variant(
        self,
        ckpt: str,
        state: dict,
        fusion: str | None = None,
        experts: str | None = None,
        variance_head: bool | None = None,
    ) -> None:
        """A checkpoint of another gate variant (fusion, experts family, or -- for gates that learn -- with or
        without the variance head) than the command's (by default the instantiated model's) is refused, naming
        both."""
        saved = state.get("hyper_parameters", {})
        if "fusion" not in saved:
            return
        if fusion is None:
            fusion, experts = self.model.hparams.fusion, self.model.family
            variance_head = self.model.hparams.variance_head
        checks = [
            ("--model.fusion", fusion, saved["fusion"]),
            (
                "--model.experts",
                experts or default_family(fusion),
                saved.get("experts") or default_family(saved["fusion"]),
            ),
        ]
        if fusion not in ("oracle", "global"):  # the gates that learn nothing have no head either way
            checks.append(("--model.variance_head", bool(variance_head), bool(saved.get("variance_head", True))))
        for flag, here, there in checks:
            if there != here:
                raise CheckpointError(
                    f"{ckpt}: trained with {flag} {there}, but this command has {flag} {here}; "
                    f"pass {flag} {there} (or the config it was trained with)"
                )

    def _check_resumed_experts(self, ckpt: str, state: dict) -> None:
        """A run resumed from ``ckpt`` must find the same experts the checkpoint was trained with: the
        cached gate inputs were built for the prepared ones."""
        saved = state["state_dict"]
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
    """The LightningCLI on ``args`` (``None`` reads sys.argv); errors propagate (``moe.main`` prints them)."""
    quiet_lightning()
    torch.set_float32_matmul_precision("high")
    return MoECLI(
        GatedMoE,
        SpectraDataModule,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"max_epochs": 8, "log_every_n_steps": 20},
        args=args,
        parser_kwargs={
            "description": DESCRIPTION,
            "exit_on_error": False,
            **{name: {"description": text, "exit_on_error": False} for name, text in SUBCOMMANDS.items()},
        },
    )
