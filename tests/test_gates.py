"""Gates: fusions learn, experts stay frozen, weights on the simplex, the product identity, the CLI."""

from __future__ import annotations

import csv
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import noisy_batch

from moe import cli as cli_module
from moe.cli import cli_main
from moe.data.datamodule import SpectraDataModule
from moe.data.shards import LABEL_COLUMNS
from moe.experts.bundle import ExpertsMismatchError
from moe.gates import FUSIONS, GatedMoE, normalized_product
from moe.gates.fusions import ProductGate, TemperatureGate
from moe.gates.metrics import summary_table
from moe.prepare import prepare

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.fixture(scope="module")
def dm(tiny_dir):
    return SpectraDataModule(tiny_dir, batch_size=128, num_workers=0, synth=None)


def _model(dm, fusion, experts=None, **kw):
    m = GatedMoE(
        fusion=fusion,
        experts=experts,
        n_pixels=dm.n_pixels,
        noise_level=dm.noise_level,
        expert_min_samples=10,
        feature_rows=600,
        **kw,
    )
    m.load_prepared(prepare(dm, m.prepare_config(), progress=False))
    return m


@pytest.mark.parametrize("fusion", ["concat", "logit_add", "product", "temperature", "phys_only", "quality_only"])
def test_fusion_learns_and_experts_stay_frozen(dm, fusion):
    torch.manual_seed(0)
    model = _model(dm, fusion)
    batch = noisy_batch(dm, 256)
    experts_before = model.mixture.experts.weight.clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):
        out = model(batch)
        loss = torch.nn.functional.mse_loss(out.pred[:, 0], batch["log_g"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    assert losses[-1] < losses[0] * 0.97, losses[::10]
    assert torch.equal(model.mixture.experts.weight, experts_before)
    assert model.mixture.experts.weight.grad is None and not model.mixture.experts.weight.requires_grad
    assert all(not b.requires_grad for b in model.buffers())
    w = model(batch).weights  # [B, L, K]
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[:2]), atol=1e-5) and (w >= 0).all()


def test_nothing_learned_baselines(dm):
    batch = noisy_batch(dm, 64)
    oracle = _model(dm, "oracle")
    out = oracle(batch)
    assert torch.equal(out.weights[:, 0].argmax(-1), batch["phys_bin"]) and torch.all(out.entropy < 1e-6)
    assert not list(oracle.parameters()) and oracle.configure_optimizers() is None
    glob = _model(dm, "global")
    assert glob.mixture.experts.n_experts == 1
    torch.testing.assert_close(glob(batch).pred, glob.mixture.global_expert(batch["flux"])[:, 0])
    snr_oracle = _model(dm, "oracle", experts="snr")
    assert torch.equal(snr_oracle(batch).weights[:, 0].argmax(-1), batch["snr_bin"])
    with pytest.raises(ValueError, match="unknown fusion"):
        GatedMoE(fusion="mystery")


def test_normalized_product_is_logit_add_and_weighted_product_differs():
    torch.manual_seed(0)
    a, b = torch.randn(64, 9, dtype=torch.float64) * 3, torch.randn(64, 9, dtype=torch.float64) * 3
    torch.testing.assert_close(normalized_product(a, b), torch.softmax(a + b, -1), rtol=1e-12, atol=1e-15)
    gate = ProductGate(13, 10, 9).double()
    phys, qual = torch.randn(64, 13, dtype=torch.float64), torch.randn(64, 10, dtype=torch.float64)
    a, b = gate.logits(phys, qual)
    torch.testing.assert_close(gate(phys, qual).weights, torch.softmax(a + b, -1))  # beta = gamma = 1 at start
    with torch.no_grad():
        gate.raw_beta.fill_(2.0)
        gate.raw_gamma.fill_(-3.0)
    w = gate(phys, qual).weights
    assert (w - torch.softmax(a + b, -1)).abs().max() > 1e-2  # learned exponents make it a different gate
    p, q = torch.softmax(a, -1), torch.softmax(b, -1)
    ref = p**gate.beta * q**gate.gamma
    torch.testing.assert_close(w, ref / ref.sum(-1, keepdim=True))
    assert gate.beta > 0 and gate.gamma > 0


def test_temperature_is_at_least_one():
    gate = TemperatureGate(13, 10, 9)
    with torch.no_grad():
        for p in gate.tau_tower.parameters():
            p.normal_(0, 5)
    out = gate(torch.randn(500, 13), torch.randn(500, 10) * 10)
    assert (out.tau >= 1).all() and out.tau.max() > 1.5
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(500, 1))


def test_mixture_sigma(dm):
    model = _model(dm, "concat", variance_head=False)
    batch = noisy_batch(dm, 32)
    out = model(batch)
    assert (model.mixture.model_var > 0).all()  # prepared: every expert has a model error on validation
    with torch.no_grad():
        model.mixture.calibration.scale.copy_(torch.tensor([[1.0, 2.0, 0.5, 3.0]]))
    out = model(batch)
    # one label (log g): [B, K, 1] -> [B, K]
    noise = model.mixture.experts.predictive_variance(batch["error"], dm.noise_level).double()[..., 0]
    var = noise + model.mixture.model_var.double()[:, 0].T[batch["snr_bin"]]  # noise + model error of the SNR bin
    mu, w = out.expert_preds.double()[..., 0], out.weights.double()[:, 0]
    m = (w * mu).sum(-1)
    spread = ((w * (var + (mu - m[:, None]) ** 2)).sum(-1)).sqrt()  # law of total variance
    scale = model.mixture.calibration.scale.double()[0]
    expect = spread * scale[batch["snr_bin"]]
    torch.testing.assert_close(out.sigma.double()[:, 0], expect, rtol=1e-3, atol=1e-4)
    with torch.no_grad():  # the recalibration's exponent about each bin's reference sigma
        model.mixture.calibration.ref.copy_(torch.tensor([[0.5, 0.8, 1.2, 2.0]]))
        model.mixture.calibration.power.fill_(1.5)
    ref = model.mixture.calibration.ref.double()[0][batch["snr_bin"]]
    expect = scale[batch["snr_bin"]] * ref * (spread / ref) ** 1.5
    torch.testing.assert_close(model(batch).sigma.double()[:, 0], expect, rtol=1e-3, atol=1e-4)
    with torch.no_grad():  # and the factor of the cell of the standardised prediction within its bin
        model.mixture.calibration.cell_edges.copy_(torch.tensor([-0.5, 0.0, 0.5, 1.0]).expand(1, 4, 4))
        model.mixture.calibration.cell_scale.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).expand(1, 4, 5))
    out = model(batch)
    x = (out.pred.double()[:, 0] - float(model.mixture.label_mean[0])) / float(model.mixture.label_std[0])
    factor = 1.0 + (x[:, None] > torch.tensor([-0.5, 0.0, 0.5, 1.0]).double()).sum(-1)
    assert len(set(factor.tolist())) > 1  # the stars fall in several cells
    torch.testing.assert_close(out.sigma.double()[:, 0], expect * factor, rtol=1e-3, atol=1e-4)
    # with the variance head: the experts' noise variances mixed (their disagreement left out) plus the
    # head's model-error variance (standardised units, times the label's variance), then the same recalibration
    head = _model(dm, "concat")
    out = head(batch)
    w = out.weights.double()[:, 0]
    noise_s = (w * noise).sum(-1).sqrt()
    torch.testing.assert_close(out.noise_spread.double()[:, 0], noise_s, rtol=1e-3, atol=1e-5)
    std2 = float(head.mixture.label_std[0]) ** 2
    model_var = out.log_model_var.double()[:, 0].exp() * std2
    expect = (noise_s.square() + model_var).sqrt() * head.mixture.calibration.scale.double()[0][batch["snr_bin"]]
    torch.testing.assert_close(out.sigma.double()[:, 0], expect, rtol=1e-3, atol=1e-4)
    assert _model(dm, "oracle").mixture.variance_head is None  # nothing learned there: the prepared estimate


def _cli(tmp_path, *extra, tiny_dir):
    return [
        "--data.data_dir",
        tiny_dir,
        "--data.num_workers",
        "0",
        "--data.batch_size",
        "128",
        "--model.expert_min_samples",
        "10",
        "--model.feature_rows",
        "600",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_fast_dev_run(tmp_path, tiny_dir, config, recwarn):
    """Every config fits; none prints a warning (the gates that learn nothing included)."""
    cli = cli_main(["fit", "--config", str(config), *_cli(tmp_path, "--trainer.fast_dev_run", "1", tiny_dir=tiny_dir)])
    assert cli.trainer.state.finished
    assert not [str(w.message) for w in recwarn if issubclass(w.category, UserWarning)]


def test_fit_logs_tensorboard_tags_and_checkpoints(tmp_path, tiny_dir, capsys, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = _cli(
        tmp_path,
        "--trainer.max_epochs",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--test_after_fit",
        "true",
        tiny_dir=tiny_dir,
    )
    cli = cli_main(["fit", "--config", str(CONFIG_DIR / "temperature.yaml"), *args])
    out = capsys.readouterr().out
    assert "rho =" in out and "Test metric" not in out  # our tables per label, not Lightning's of every metric
    run_dir = tmp_path / "lightning_logs" / "temperature-phys"  # runs are named by fusion and experts
    assert Path(cli.trainer.log_dir) == run_dir / "version_0"
    assert list(Path(cli.trainer.log_dir).glob("events.out.tfevents.*"))
    # the run folder holds the fit's and the test's event files: read them all
    acc = EventAccumulator(cli.trainer.log_dir, size_guidance={"histograms": 0, "images": 0, "scalars": 0}).Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/nll",
        "val/r2",
        "val/entropy",
        "val/rho",
        "val/tau_snr_X",
        "val/z_std",
        "val/coverage_1sigma",
        "val/coverage_2sigma_snr_X",
        "val/r2_log_g",  # every label's metrics under its name too
        "val/z_std_log_g",
        "val/coverage_1sigma_snr_X_log_g",
        "val/sigma_check_log_g",
        "val/r2_T_eff",
        "val/r2_snr_X_M_H",
        "val/z_std_T_eff",
        "val/coverage_1sigma_M_H",
        "val/coverage_2sigma_snr_H_T_eff",
        "val/sigma_check_M_H",
        *(f"val/{m}_snr_{b}" for m in ("r2", "entropy") for b in "HMLX"),
    ):
        assert tag in scalars, tag
    assert "val/gate_weights" in acc.Tags()["histograms"]
    val_r2 = [e.value for e in acc.Scalars("val/r2")]
    hp = [e.value for e in acc.Scalars("hp_metric") if e.value == e.value]  # the NaN placeholder of the start
    assert len(val_r2) == 2 and hp[-1] == pytest.approx(max(val_r2), abs=1e-6)
    hparams = yaml.safe_load((run_dir / "version_0" / "hparams.yaml").read_text())
    assert hparams["fusion"] == "temperature" and "data/fingerprint" in hparams
    assert not [k for k in hparams if k.startswith("_")]
    assert "val/entropy_vs_snr" in acc.Tags()["images"] and "val/calibration" in acc.Tags()["images"]
    ckpts = list(Path(cli.trainer.log_dir, "checkpoints").glob("*.ckpt"))
    assert any(p.name == "last.ckpt" for p in ckpts) and any(p.name.startswith("epoch") for p in ckpts)

    # a fresh process-like CLI call resolves --ckpt_path best from the newest run
    test = cli_main(["test", "--config", str(CONFIG_DIR / "temperature.yaml"), "--ckpt_path", "best", *args[:-2]])
    assert "test/r2" in test.trainer.callback_metrics
    out = capsys.readouterr().out
    assert "SNR X" in out and "rho =" in out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("test ")] == [
        f"test {label}"
        for label in LABEL_COLUMNS  # one table per label
    ]
    assert "test/r2_T_eff" in test.trainer.callback_metrics
    # evaluating a run's checkpoint logs into the run's own folder: no new version
    assert [p.name for p in run_dir.iterdir()] == ["version_0"]
    acc = EventAccumulator(str(run_dir / "version_0"), size_guidance={"scalars": 0}).Reload()
    assert "test/r2" in acc.Tags()["scalars"]

    pred_csv = tmp_path / "pred.csv"
    heap_events = []

    @contextmanager
    def recording_heap():  # predict's batches run under the block-heap setting, left when predict ends
        heap_events.append("enter")
        yield
        heap_events.append("exit")

    monkeypatch.setattr(cli_module, "block_heap", recording_heap)
    predict_step = GatedMoE.predict_step

    def recorded_step(self, *args, **kwargs):
        heap_events.append("batch")
        return predict_step(self, *args, **kwargs)

    monkeypatch.setattr(GatedMoE, "predict_step", recorded_step)
    cli_main(
        [
            "predict",
            "--config",
            str(CONFIG_DIR / "temperature.yaml"),
            "--ckpt_path",
            "best",
            "--predict_writer.output",
            str(pred_csv),
            *args[:-2],
        ]
    )
    assert [p.name for p in run_dir.iterdir()] == ["version_0"]
    assert heap_events[0] == "enter" and heap_events[-1] == "exit" and set(heap_events[1:-1]) == {"batch"}
    rows = list(csv.DictReader(pred_csv.open()))
    assert len(rows) == 300
    names = test.model.mixture.experts.names
    assert list(rows[0]) == [
        "shard",
        "row",
        "mag",
        "snr",
        "snr_bin",
        *(f"{label}_{s}" for label in LABEL_COLUMNS for s in ("pred", "sigma")),
        "rho_log_g_T_eff",
        "rho_log_g_M_H",
        "rho_T_eff_M_H",
        *(f"w_{label}_{n}" for label in LABEL_COLUMNS for n in names),  # per-label routing: each its own weights
        *(f"pred_{label}_{n}" for label in LABEL_COLUMNS for n in names),
        *(f"{label}_true" for label in LABEL_COLUMNS),
        *(f"{label}_edge" for label in LABEL_COLUMNS),
        "n_masked",
        "ood_score",
        "flags",
    ]
    for label in LABEL_COLUMNS:
        assert abs(sum(float(rows[0][f"w_{label}_{n}"]) for n in names) - 1) < 1e-4
        pred = sum(float(rows[0][f"w_{label}_{n}"]) * float(rows[0][f"pred_{label}_{n}"]) for n in names)
        assert pred == pytest.approx(float(rows[0][f"{label}_pred"]), rel=1e-4, abs=1e-4)
    assert {r["snr_bin"] for r in rows} <= {"X", "L", "M", "H"}


@pytest.fixture(scope="module")
def concat_checkpoint(tmp_path_factory, tiny_dir):
    """A one-epoch concat run of log g alone: (its last.ckpt, the CLI arguments it was trained with)."""
    root = tmp_path_factory.mktemp("concat_run")
    args = _cli(root, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", tiny_dir=tiny_dir)
    args += ["--model.labels", "[log_g]"]
    cli = cli_main(["fit", "--config", str(CONFIG_DIR / "dual_tower.yaml"), *args])
    return Path(cli.trainer.log_dir, "checkpoints", "last.ckpt"), args


def test_checkpoint_of_another_fusion_is_refused(concat_checkpoint):
    ckpt, args = concat_checkpoint
    message = r"last\.ckpt: trained with --model\.fusion concat, but this command has --model\.fusion logit_add"
    for command in ("test", "fit"):  # evaluated or resumed: refused before any work
        with pytest.raises(ExpertsMismatchError, match=message):
            cli_main([command, "--config", str(CONFIG_DIR / "logit_add.yaml"), "--ckpt_path", str(ckpt), *args])


def test_checkpoint_from_other_data_is_refused(concat_checkpoint):
    ckpt, args = concat_checkpoint
    with pytest.raises(ExpertsMismatchError, match="last.ckpt: trained on data .*, but --data holds data"):
        cli_main(
            [
                "test",
                "--config",
                str(CONFIG_DIR / "dual_tower.yaml"),
                "--ckpt_path",
                str(ckpt),
                *args,
                "--data.noise_level",
                "0.5",
            ]
        )


def test_checkpoint_of_an_earlier_moe_is_one_error_naming_the_tensor(concat_checkpoint, tmp_path):
    ckpt, args = concat_checkpoint
    state = torch.load(ckpt, weights_only=True)
    head = "mixture.variance_head.0.weight"
    state["state_dict"][head] = state["state_dict"][head][:, :-1]  # an older head
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    message = (
        r"old\.ckpt: its mixture\.variance_head\.0\.weight has shape \(32, 25\), this model's is \(32, 26\); the checkpoint "
        r"was saved by another version of moe or edited: retrain it"
    )
    for command in ("test", "fit"):  # evaluated or resumed: refused, naming the file, before any work
        with pytest.raises(ExpertsMismatchError, match=message):
            cli_main([command, "--config", str(CONFIG_DIR / "dual_tower.yaml"), "--ckpt_path", str(old), *args])
    del state["state_dict"][head]
    torch.save(state, old)
    with pytest.raises(
        ExpertsMismatchError, match=r"old\.ckpt: has no mixture\.variance_head\.0\.weight, which this model"
    ):
        cli_main(["test", "--config", str(CONFIG_DIR / "dual_tower.yaml"), "--ckpt_path", str(old), *args])


def _earlier_layout(state: dict, power_map: bool = True) -> dict:
    """A state_dict (of a log-g-only gate) as moe saved it before GatedMoE held its network in ``mixture``: every
    tensor at the top, the sigma map as ``sigma_scale / sigma_ref / sigma_power`` (only ``sigma_scale`` before the
    power map), and before the label axis: experts [K, D], bias [K], model_var [K, 4], the sigma map [4], no label
    statistics, no error correlations and no cells of the prediction."""
    old = {}
    for name, value in state.items():
        if name in ("mixture.label_mean", "mixture.label_std") or name.startswith(
            ("mixture.calibration.rho", "mixture.calibration.cell_")
        ):
            continue
        if name.endswith(("experts.weight", "experts.bias", "expert.weight", "expert.bias", "model_var")):
            value = value.squeeze(1)
        elif name.startswith("mixture.calibration."):
            value = value.squeeze(0)
        name = name.removeprefix("mixture.")
        if name.startswith("calibration."):
            if not power_map and name != "calibration.scale":
                continue
            name = "sigma_" + name.removeprefix("calibration.")
        old[name] = value
    return old


def test_checkpoint_of_the_earlier_layout_loads_and_tests_the_same(concat_checkpoint, tmp_path, capsys):
    ckpt, args = concat_checkpoint
    state = torch.load(ckpt, weights_only=True)
    assert {"mixture.calibration.scale", "mixture.calibration.ref", "mixture.calibration.power"} <= set(
        state["state_dict"]
    )
    # an earlier moe's variance head read log g - 3 unstandardised: what the upgrade fills in for it
    state["state_dict"]["mixture.label_mean"] = torch.tensor([3.0])
    state["state_dict"]["mixture.label_std"] = torch.tensor([1.0])
    current = tmp_path / "current.ckpt"
    torch.save(state, current)
    earlier_hparams = {k: v for k, v in state["hyper_parameters"].items() if k not in ("labels", "routing")}
    tables = []
    for path in (current, tmp_path / "earlier.ckpt"):
        if path != current:
            old = {"state_dict": _earlier_layout(state["state_dict"]), "hyper_parameters": earlier_hparams}
            torch.save(state | old, path)
        cli_main(["test", "--config", str(CONFIG_DIR / "dual_tower.yaml"), "--ckpt_path", str(path), *args])
        tables.append(capsys.readouterr().out.split("\ntest log_g: ")[-1])
    assert "rho =" in tables[0] and tables[1] == tables[0]  # the same experts, gate, head and sigma map
    resumed = cli_main(  # and a run continues from it (its optimiser state follows the same parameters)
        ["fit", "--config", str(CONFIG_DIR / "dual_tower.yaml"), "--ckpt_path", str(tmp_path / "earlier.ckpt"), *args]
        + ["--trainer.max_epochs", "2"]
    )
    assert resumed.trainer.current_epoch == 2 and resumed.trainer.global_step == 4
    # through Lightning's own loading (the load hook upgrades it), and from before the power map
    loaded = GatedMoE.load_from_checkpoint(tmp_path / "earlier.ckpt", weights_only=False, labels=["log_g"])
    for name, value in state["state_dict"].items():
        if torch.is_tensor(value):  # (an expert's extra state is its names)
            torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0, msg=name)
    torch.save(state | {"state_dict": _earlier_layout(state["state_dict"], power_map=False)}, tmp_path / "plain.ckpt")
    plain = GatedMoE.load_from_checkpoint(tmp_path / "plain.ckpt", weights_only=False, labels=["log_g"])
    calibration = plain.mixture.calibration
    assert torch.equal(calibration.scale, state["state_dict"]["mixture.calibration.scale"])
    assert torch.equal(calibration.ref, torch.ones(1, 4)) and torch.equal(calibration.power, torch.ones(1, 4))


def test_checkpoint_of_other_labels_names_the_flag_and_the_file(concat_checkpoint, tmp_path):
    """A checkpoint trained on other labels than --model.labels is refused before any work, in one line naming the
    flag, both values and the checkpoint; one saved before labels were a setting counts as log g alone."""
    ckpt, args = concat_checkpoint
    message = (
        r"last\.ckpt: trained with --model\.labels \[log_g\], but this command has --model\.labels "
        r"\[log_g, T_eff\]; pass --model\.labels \[log_g\]"
    )
    for command in ("test", "predict", "fit"):
        with pytest.raises(ExpertsMismatchError, match=message):
            cli_main(
                [command, "--config", str(CONFIG_DIR / "dual_tower.yaml"), "--ckpt_path", str(ckpt), *args]
                + ["--model.labels", "[log_g, T_eff]"]
            )
    state = torch.load(ckpt, weights_only=True)
    state["hyper_parameters"].pop("labels")  # as an earlier moe saved it
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    with pytest.raises(ExpertsMismatchError, match=r"old\.ckpt: trained with --model\.labels \[log_g\], but this"):
        cli_main(
            ["test", "--config", str(CONFIG_DIR / "dual_tower.yaml"), "--ckpt_path", str(old), *args]
            + ["--model.labels", "[T_eff]"]
        )


def test_checkpoint_without_the_variance_head_names_the_flag(concat_checkpoint):
    ckpt, args = concat_checkpoint
    message = r"trained with --model\.variance_head True, but this command has --model\.variance_head False"
    with pytest.raises(ExpertsMismatchError, match=message):
        cli_main(
            ["test", "--config", str(CONFIG_DIR / "dual_tower.yaml"), "--ckpt_path", str(ckpt), *args]
            + ["--model.variance_head", "false"]
        )


def test_resume_from_last_checkpoint(tmp_path, tiny_dir):
    args = _cli(tmp_path, "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", tiny_dir=tiny_dir)
    first = cli_main(["fit", "--config", str(CONFIG_DIR / "logit_add.yaml"), "--trainer.max_epochs", "1", *args])
    assert "val/r2" in first.trainer.progress_bar_metrics  # the monitored metric is shown while training
    last = Path(first.trainer.log_dir, "checkpoints", "last.ckpt")
    second = cli_main(
        [
            "fit",
            "--config",
            str(CONFIG_DIR / "logit_add.yaml"),
            "--trainer.max_epochs",
            "2",
            "--ckpt_path",
            str(last),
            *args,
        ]
    )
    assert second.trainer.current_epoch == 2 and second.trainer.global_step == 4


def test_summary_table_lists_bins():
    text = summary_table({"test/r2": 0.6, "test/rho": 0.8, "test/r2_snr_X": 0.2, "test/entropy_snr_X": 1.5})
    assert "SNR X" in text and "0.2000" in text and "rho = 0.800" in text
    snr_h = text.splitlines()[2]
    assert snr_h.startswith("SNR H") and snr_h.endswith("no spectra in this bin") and "nan" not in snr_h


def test_all_fusions_listed():
    assert set(FUSIONS) == {
        "concat",
        "logit_add",
        "product",
        "temperature",
        "phys_only",
        "quality_only",
        "oracle",
        "global",
    }
    assert {p.stem for p in CONFIGS} >= {
        "quickstart",
        "dual_tower",
        "logit_add",
        "product",
        "temperature",
        "phys_only",
        "quality_only",
        "oracle",
        "global",
        "experts36",
    }


def test_resume_with_other_experts_is_refused(tmp_path, tiny_dir):
    args = _cli(tmp_path, "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", tiny_dir=tiny_dir)
    first = cli_main(["fit", "--config", str(CONFIG_DIR / "logit_add.yaml"), "--trainer.max_epochs", "1", *args])
    state = torch.load(Path(first.trainer.log_dir, "checkpoints", "last.ckpt"), weights_only=False)  # our own file
    state["state_dict"]["mixture.experts.weight"] += 0.01  # trained with other experts than those prepared now
    other = tmp_path / "other.ckpt"
    torch.save(state, other)
    with pytest.raises(ExpertsMismatchError, match="other.ckpt: its experts differ from those prepared for this run"):
        cli_main(
            [
                "fit",
                "--config",
                str(CONFIG_DIR / "logit_add.yaml"),
                "--trainer.max_epochs",
                "2",
                "--ckpt_path",
                str(other),
                *args,
            ]
        )


class _Payload:
    """Unpickling this runs code: what a planted checkpoint could do under weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_planted_checkpoint_is_never_executed(tmp_path, tiny_dir):
    marker = tmp_path / "executed"
    args = _cli(tmp_path, tiny_dir=tiny_dir)
    # another run's folder is never searched: only lightning_logs/concat-phys/ belongs to this command
    elsewhere = tmp_path / "lightning_logs" / "version_3" / "checkpoints" / "last.ckpt"
    elsewhere.parent.mkdir(parents=True)
    torch.save({"callbacks": {"ModelCheckpoint": {"best_model_path": _Payload(marker)}}}, elsewhere)
    with pytest.raises(ExpertsMismatchError, match=r"--ckpt_path best: no checkpoint of run 'concat-phys' under"):
        cli_main(["test", "--config", str(CONFIG_DIR / "dual_tower.yaml"), "--ckpt_path", "best", *args])
    planted = tmp_path / "lightning_logs" / "concat-phys" / "version_9" / "checkpoints" / "last.ckpt"
    planted.parent.mkdir(parents=True)
    torch.save({"callbacks": {"ModelCheckpoint": {"best_model_path": _Payload(marker)}}}, planted)
    with pytest.raises(
        ExpertsMismatchError, match=r"concat-phys/version_9/checkpoints/last\.ckpt: not a loadable moe checkpoint"
    ):
        cli_main(["test", "--config", str(CONFIG_DIR / "dual_tower.yaml"), "--ckpt_path", "best", *args])
    assert not marker.exists()


def _sample_residuals(model, source):
    """The calibration sample's residuals as the fit's recalibration computes them."""
    mixture = model.mixture
    return mixture.calibration.sample_residuals(source, model.device, mixture.mix_inputs, mixture.mix, mixture.targets)


def test_calibration_residuals_from_kept_inputs_equal_a_fresh_pass(dm):
    model = _model(dm, "concat").eval()
    resid, spread, snr_bin, pred = _sample_residuals(model, dm.calibration_batches)
    with torch.no_grad():  # the reference: every calibration batch through the whole model
        outs = [(model(b), b) for b in dm.calibration_batches(65_536, 2)]
    np.testing.assert_allclose(
        resid[:, 0], torch.cat([o.pred[:, 0] - b["log_g"] for o, b in outs]).numpy(), rtol=1e-6, atol=1e-9
    )
    np.testing.assert_allclose(spread, torch.cat([o.spread for o, _ in outs]).numpy(), rtol=1e-6)
    np.testing.assert_allclose(pred, torch.cat([o.pred for o, _ in outs]).numpy(), rtol=1e-6)
    assert np.array_equal(snr_bin, torch.cat([b["snr_bin"] for _, b in outs]).numpy())
    assert len(resid) == 2 * dm.train_set.n_kept  # the tiny split is smaller than the sample: all of it, twice
    with torch.no_grad():
        for p in model.mixture.gate.parameters():
            p.add_(0.1)  # the model moves on; its residuals follow
    again = _sample_residuals(model, None)  # later epochs reuse the kept inputs: no reads
    assert not np.allclose(again[0], resid) and np.array_equal(again[2], snr_bin)


def test_no_calibration_stars_leave_sigma_unfitted_not_a_crash(dm):
    model = _model(dm, "concat").eval()
    resid, spread, snr_bin, pred = _sample_residuals(model, lambda *a: iter(()))  # e.g. every training row dropped
    assert len(resid) == len(spread) == len(snr_bin) == len(pred) == 0 and model.mixture.calibration._sample is None
    scale = model.mixture.calibration.scale.clone()
    assert model.mixture.calibration.refit(resid, spread, snr_bin, pred) == [None] * 3  # no held-out rows either
    assert torch.equal(model.mixture.calibration.scale, scale)  # sigma = spread
    assert torch.equal(model.mixture.calibration.rho, torch.zeros(3, 4, 4))  # no evidence of a correlation


def test_a_tiny_snr_bin_stops_only_the_gates_that_mix_the_snr_experts(tmp_path, tiny_dir, capsys):
    """At noise level 0.5 the tiny set's SNR-X bin holds 2 training rows (every physical bin >= 72): with
    default settings the dual-tower gate trains (SNR-X, fitted alongside, is the global expert: one INFO
    line) and the quality-only and 36-cell gates, which mix the SNR groups, stop with one line each."""
    import shutil

    from moe.main import main

    data = tmp_path / "data"
    shutil.copytree(tiny_dir, data, ignore=shutil.ignore_patterns("noisy_*", "gate_inputs_*", "experts", ".*"))
    args = [
        *("--data.data_dir", str(data), "--data.noise_level", "0.5", "--data.num_workers", "0"),
        *("--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "1"),
        *("--trainer.enable_progress_bar", "false"),
    ]
    assert main(["fit", "--config", "dual_tower", *args]) == 0
    err = capsys.readouterr().err  # the project's log lines
    assert err.count("expert snr/SNR-X has 2 training rows, fewer than 50: the global expert stands in") == 1
    assert "moe: error" not in err and "expert phys/" not in err
    for config in ("quality_only", "experts36"):
        assert main(["fit", "--config", config, *args]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("moe: error:")]
        assert len(errors) == 1 and "Traceback" not in err, err
        assert errors[0].startswith(
            "moe: error: 1 expert group(s) have fewer than 50 training rows: snr/SNR-X (2); use more training rows"
        ), errors[0]
