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
import signal
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info

from moe.data.datamodule import SpectraDataModule
from moe.data.row_check import deferred_screens
from moe.data.shards import check_grid, read_wave
from moe.experts.bundle import default_dir
from moe.gates.callbacks import CatalogueWriter, RunSummary
from moe.gates.checkpoints import (
    RUNS_DIR,
    CheckpointError,
    check_checkpoint,
    check_variant,
    find_checkpoint,
    read_checkpoint,
    run_name,
    version_of,
)
from moe.gates.metrics import summary_table
from moe.gates.module import GatedMoE
from moe.gates.quiet import quiet_lightning
from moe.prepare import attach_inputs, prepare, stream_labels
from moe.prepare.reference import load_or_build
from moe.shared.heap import block_heap

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


def start_ranks(trainer: pl.Trainer, meanwhile: Callable[[], object] = lambda: None) -> None:
    """Start the run's processes and their process group now, before the preparation, so that it splits over
    the ranks (:mod:`moe.data.ranks`): Lightning's DDP launcher starts the other local ranks here (not again
    when the trainer runs), torchrun / SLURM have started them already, and the trainer later finds the process
    group initialised and uses it. Other strategies (one device, ``ddp_spawn``) prepare in one process.

    ``meanwhile`` runs on every rank between starting the other local ranks and waiting for them to join the
    group (once, in one process too): the row checks, so rank 0 checks shards while the others start up."""
    strategy = trainer.strategy
    if (
        not isinstance(strategy, DDPStrategy)
        or not isinstance(strategy.launcher, _SubprocessScriptLauncher)
        or strategy.num_processes * strategy.num_nodes < 2
        or torch.distributed.is_initialized()
    ):
        meanwhile()
        return
    try:
        strategy.launcher.launch(meanwhile, trainer=trainer)
    except BaseException:  # e.g. a bad row: the ranks started here would wait for this one -- stop them, say it once
        strategy.launcher.kill(signal.SIGTERM)
        raise
    strategy.setup_environment()


class SaveFitConfig(SaveConfigCallback):
    """Saves the config into the run folder on ``fit`` only: evaluating a run leaves the config it was trained
    with."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:
            super().setup(trainer, pl_module, stage)


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

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse, then refuse a ``--ckpt_path`` file of another gate variant than the command asks for, naming
        both: Lightning next replaces the model settings with the checkpoint's own (which would otherwise
        silently win)."""
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and Path(ckpt).is_file():
            check_variant(self._checkpoint(ckpt).get("hyper_parameters", {}), self.config[sub]["model"], ckpt)

    def _checkpoint(self, path: str) -> dict:
        """The contents of checkpoint ``path``, read once per command (the parse check and the preparation
        both need them)."""
        states = self.__dict__.setdefault("_checkpoint_states", {})
        if path not in states:
            states[path] = read_checkpoint(path)
        return states[path]

    def instantiate_classes(self) -> None:
        """Instantiate as LightningCLI does, with the datamodule's row checks queued: they run once the run's
        other processes are starting (:meth:`_check_rows`, from :func:`start_ranks`)."""
        with deferred_screens() as self._row_checks:
            super().instantiate_classes()

    def _check_rows(self) -> None:
        """The queued row checks of the datamodule (:mod:`moe.data.row_check`), before anything reads its rows."""
        while self._row_checks:
            self._row_checks.pop(0)()

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        """The trainer of the command's run: a TensorBoardLogger in the run's folder (fit: a new version, or
        the resumed one; evaluation: the checkpoint's own version, or none for a file from elsewhere), a
        RichProgressBar and the run's TensorBoard summary (:class:`~moe.gates.callbacks.RunSummary`)."""
        config = self.config_init[self.subcommand]["trainer"]
        root = config.get("default_root_dir") or os.getcwd()
        run = run_name(self.model.hparams.fusion, self.model.family)
        version = self._resolve_checkpoint(root, run)
        if config.get("logger") in (None, True):
            keep = self.subcommand == "fit" or version is not None
            logger = TensorBoardLogger(Path(root) / RUNS_DIR, name=run, version=version, default_hp_metric=False)
            kwargs["logger"] = logger if keep else False
        callbacks = config.get("callbacks") or []
        callbacks = [*callbacks] if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(RichProgressBar())
        kwargs["callbacks"] = [*callbacks, RunSummary()]
        return super().instantiate_trainer(**kwargs)

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
        with a checkpoint -- from the checkpoint itself, with the gate-input caches built for its experts.
        A checkpoint that does not fit (:func:`~moe.gates.checkpoints.check_checkpoint`) is refused first."""
        cfg = self.config_init[self.subcommand]
        ckpt = cfg.get("ckpt_path")
        start_ranks(self.trainer, self._check_rows)
        if self.subcommand == "predict":  # the catalogue is written batch by batch: keep nothing in memory
            cfg["return_predictions"] = False
        state = self._checked(ckpt) if ckpt is not None else None  # refused before any work
        if self.subcommand == "fit" or ckpt is None:
            self.model.load_prepared(prepare(self.datamodule, self.model.prepare_config()))
            if state is not None:  # resumed: its experts must be the ones just prepared
                self._checked(ckpt)
            self._catalogue_reference()
            return
        self.model.load_state_dict(state["state_dict"])
        stream_labels(self.datamodule, self.model.labels)
        self.model.data_fingerprint = state.get("moe_data_fingerprint") or self.datamodule.fingerprint_hash()
        if self.subcommand == "predict":
            wave = self.model.mixture.physics.wave.cpu().numpy()
            for path in self.datamodule.predict_set().paths:
                check_grid(path, read_wave(path), wave, f"the checkpoint's ({ckpt})")
        # predict reads the spectra themselves (masked pixels, the OOD score): no gate-input caches
        splits = {"validate": ("val",), "test": ("test",)}.get(self.subcommand, ())
        mixture = self.model.mixture
        attach_inputs(self.datamodule, *mixture.projection(), mixture.physics.pixels, splits, shared=True)
        self._catalogue_reference()

    def _catalogue_reference(self) -> None:
        """For ``predict``: what the catalogue compares stars with (:mod:`moe.prepare.reference`), cached beside
        the expert bundles."""
        if self.subcommand == "predict":
            cache = self.model.prepare_config().experts_dir or default_dir(self.datamodule.data_dir)
            self.model.catalogue_reference = load_or_build(self.datamodule, cache)

    def _checked(self, ckpt: str) -> dict:
        """The contents of ``ckpt`` once they fit this model and data (upgraded in place), else one error."""
        state = self._checkpoint(ckpt)
        check_checkpoint(self.model, state, ckpt, self.datamodule.fingerprint_hash(), "--data")
        return state

    before_fit = before_validate = before_test = _prepare

    def before_predict(self) -> None:
        """Prepare, then predict under :func:`~moe.shared.heap.block_heap`: each batch's [batch, pixels] arrays
        reuse the heap (left in :meth:`after_predict`, or with the process)."""
        self._prepare()
        self._heap = ExitStack()
        self._heap.enter_context(block_heap())

    def after_predict(self) -> None:
        self._heap.close()

    def after_test(self) -> None:
        self._print_table()

    def after_fit(self) -> None:
        if self.config_init["fit"].get("test_after_fit") and not self.trainer.fast_dev_run:
            best = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or None
            # the tables below say it per label and SNR bin: not Lightning's table of every logged metric too
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False)
            self._print_table()

    def _print_table(self) -> None:
        if self.trainer.is_global_zero:
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("test/")}
            for label in self.model.labels:  # one table per label
                print(
                    f"\ntest {label}: fusion {self.model.hparams.fusion}, experts {self.model.family} "
                    f"({self.model.mixture.experts.n_experts}), noise_level {self.datamodule.noise_level}"
                )
                print(summary_table(metrics, label=label))


def cli_main(args: list[str] | None = None) -> MoECLI:
    """The LightningCLI on ``args`` (``None`` reads sys.argv); errors propagate (``moe.main`` prints them)."""
    quiet_lightning()
    torch.set_float32_matmul_precision("high")
    return MoECLI(
        GatedMoE,
        SpectraDataModule,
        seed_everything_default=42,
        save_config_callback=SaveFitConfig,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"max_epochs": 8, "log_every_n_steps": 20},
        args=args,
        parser_kwargs={
            "description": DESCRIPTION,
            "exit_on_error": False,
            **{name: {"description": text, "exit_on_error": False} for name, text in SUBCOMMANDS.items()},
        },
    )
