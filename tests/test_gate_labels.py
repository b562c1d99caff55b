"""Several labels in one gate: the label axis of the experts, the mixture, sigma's recalibration, the loss,
predict's values and the catalogue's columns -- with small experts built here from the tiny data's log g
experts (T_eff and [M/H] experts: scaled and perturbed copies), checked against one-label mixtures and numpy."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import DUAL_TOWER_CONFIG, noisy_batch

from moe.catalogue.writers import column_meta
from moe.cli import cli_main
from moe.data.datamodule import SpectraDataModule
from moe.experts.ridge_experts import RidgeExperts
from moe.gates import GatedMoE
from moe.gates.calibration import SigmaCalibration
from moe.gates.callbacks import CatalogueWriter
from moe.gates.checkpoints import read_checkpoint
from moe.gates.fusions import FUSIONS, LearnedGate, build_gate
from moe.gates.metrics import summary_table
from moe.prepare import prepare

LABELS = ("log_g", "T_eff", "M_H")
SCALES = {"log_g": 1.0, "T_eff": 700.0, "M_H": -0.6}  # the made-up experts of a label: this times log g's + noise
OFFSETS = {"log_g": 0.0, "T_eff": 2800.0, "M_H": 1.2}


@pytest.fixture(scope="module")
def dm(tiny_dir):
    return SpectraDataModule(tiny_dir, batch_size=128, num_workers=0, synth=None)


@pytest.fixture(scope="module")
def one_label(dm):
    """The tiny data's prepared log g gate inputs (phys family)."""
    m = GatedMoE("concat", n_pixels=dm.n_pixels, expert_min_samples=10, feature_rows=600, labels=["log_g"])
    return prepare(dm, m.prepare_config(), progress=False)


def _label_experts(experts: RidgeExperts, labels=LABELS, seed=0) -> RidgeExperts:
    """[K, L, D] experts: each label's a scaled, perturbed copy of the one-label experts (log g's unperturbed)."""
    w, b = experts.weight[:, 0], experts.bias[:, 0]
    ws, bs = [], []
    for name in labels:
        g = torch.Generator().manual_seed(seed + LABELS.index(name))  # a label's experts whatever the others
        noise = 0.0 if name == "log_g" else 0.3 * w.std() * torch.randn(w.shape, generator=g)
        ws.append(SCALES[name] * (w + noise))
        bs.append(SCALES[name] * b + OFFSETS[name])
    return RidgeExperts.from_arrays(torch.stack(ws, 1), torch.stack(bs, 1), experts.names, labels)


def _prepared(one, labels=LABELS):
    """A prepared gate of ``labels`` built from the one-label preparation (caches not used: batches of spectra)."""
    stats = {n: (OFFSETS[n] + 3.0 * SCALES[n], abs(SCALES[n])) for n in labels}
    model_var = np.stack([one.model_var[:, 0] * SCALES[n] ** 2 for n in labels], 1)  # [K, L, 4]
    return dataclasses.replace(
        one,
        experts=_label_experts(one.experts, labels),
        global_expert=_label_experts(one.global_expert, labels),
        model_var=model_var,
        labels=tuple(labels),
        label_stats=stats,
    )


def _model(dm, prepared, **kw) -> GatedMoE:
    m = GatedMoE("concat", n_pixels=dm.n_pixels, labels=list(prepared.labels), **kw)
    m.load_prepared(prepared)
    return m


def test_label_axis_of_the_experts_matches_numpy_and_old_weights_read_as_log_g():
    rng = np.random.default_rng(1)
    w, b, x, e = rng.normal(size=(4, 3, 50)), rng.normal(size=(4, 3)), rng.normal(size=(7, 50)), rng.random((7, 50))
    experts = RidgeExperts.from_arrays(w, b, labels=LABELS).double()
    np.testing.assert_allclose(
        experts(torch.from_numpy(x)).numpy(), np.einsum("bd,kld->bkl", x, w) + b, rtol=1e-5, atol=1e-5
    )
    var = experts.predictive_variance(torch.from_numpy(e), 0.5).numpy()
    np.testing.assert_allclose(var, 0.25 * np.einsum("bd,kld->bkl", e**2, w**2), rtol=1e-6)
    rows_w, rows_b = experts.rows()  # expert-major rows of the projection map
    np.testing.assert_array_equal(rows_w[3 * 2 + 1].numpy(), w[2, 1].astype(np.float32))
    assert rows_b[3 * 2 + 1] == pytest.approx(b[2, 1])
    old = RidgeExperts.from_arrays(w[:, 0], b[:, 0])  # [K, D]: one label, log g
    assert old.labels == ("log_g",) and old.weight.shape == (4, 1, 50)
    with pytest.raises(ValueError, match="label names"):
        RidgeExperts.from_arrays(w, b, labels=("log_g",))


def test_three_labels_shared_routing_equal_three_one_label_mixtures(dm, one_label):
    """With shared routing and no variance head, each label of a 3-label gate is exactly the one-label gate of
    that label's experts with the same gate network: the label axis only stacks them."""
    batch = noisy_batch(dm, 200)
    torch.manual_seed(0)
    three = _model(dm, _prepared(one_label), variance_head=False, routing="shared").eval()
    with torch.no_grad():
        three.mixture.calibration.scale.copy_(torch.rand(3, 4) + 0.5)
        out = three(batch)
    assert out.pred.shape == (200, 3) and out.weights.shape == (200, 3, 9) and out.expert_preds.shape == (200, 9, 3)
    assert torch.equal(out.weights[:, 0], out.weights[:, 2])  # shared: the same weights for every label
    for i, name in enumerate(LABELS):
        single = _model(dm, _prepared(one_label, (name,)), variance_head=False).eval()
        single.mixture.gate.load_state_dict(three.mixture.gate.state_dict())
        with torch.no_grad():
            single.mixture.calibration.scale.copy_(three.mixture.calibration.scale[i : i + 1])
            ref = single(batch)
        for field in ("pred", "sigma", "spread", "global_pred"):
            torch.testing.assert_close(
                getattr(out, field)[:, i], getattr(ref, field)[:, 0], rtol=2e-5, atol=1e-4, msg=f"{field} {name}"
            )
    # numpy: pred_l = sum_k w_k (flux . w_kl + b_kl)
    e = three.mixture.experts
    mu = np.einsum("bd,kld->bkl", batch["flux"].double().numpy(), e.weight.double().numpy()) + e.bias.double().numpy()
    expect = np.einsum("bk,bkl->bl", out.weights[:, 0].double().numpy(), mu)
    np.testing.assert_allclose(out.pred.double().numpy(), expect, rtol=1e-4, atol=1e-3)


def test_per_label_routing_learns_one_gate_per_label(dm, one_label):
    batch = noisy_batch(dm, 256)
    torch.manual_seed(0)
    model = _model(dm, _prepared(one_label), routing="per_label")
    assert model.mixture.gate.groups == 3  # a gate network per label
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model._loss(model(batch), batch)
        opt.zero_grad()
        loss["loss"].backward()
        opt.step()
        losses.append(loss["mse"].detach().item())
    assert losses[-1] < losses[0] * 0.97, losses[::10]
    out = model(batch)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(256, 3))
    assert (out.weights[:, 0] - out.weights[:, 1]).abs().max() > 1e-3  # each label its own weights
    assert out.log_model_var.shape == (256, 3) and (out.sigma > 0).all()
    # the loss is the MSE of the standardised labels: T_eff in K does not swamp log g in dex
    target = torch.stack([batch[n] for n in LABELS], -1)
    std = model.mixture.label_std
    expect = ((out.pred - target) / std).square().mean()
    torch.testing.assert_close(model._loss(out, batch)["mse"], expect)
    assert torch.allclose(std, torch.tensor([1.0, 700.0, 0.6]))


def test_predict_values_name_every_label(dm, one_label):
    model = _model(dm, _prepared(one_label)).eval()
    batch = noisy_batch(dm, 16)
    with torch.no_grad():
        values = model.predict_step(batch, 0)
    for name in LABELS:
        assert values[f"{name}_pred"].shape == (16,) and values[f"{name}_sigma"].shape == (16,)
        assert torch.equal(values[f"{name}_true"], batch[name])
    assert values["weights"].shape == (16, 3, 9) and values["expert_preds"].shape == (16, 9, 3)
    # T_eff predictions are in K (the made-up experts are 700 x log g's + 2800)
    assert 2000 < float(values["T_eff_pred"].mean()) < 8000


def test_sigma_is_recalibrated_per_label():
    """Residuals of label l drawn with sd c_l * spread: the fitted map scales each label's sigma by its c_l,
    bin by bin, independently of the other labels."""
    rng = np.random.default_rng(0)
    n, c = 40_000, np.array([1.0, 3.0, 0.5])
    spread = rng.uniform(0.5, 2.0, (n, 3))
    snr_bin = rng.integers(0, 4, n)
    resid = rng.normal(size=(n, 3)) * c * spread
    calibration = SigmaCalibration(n_labels=3)
    assert calibration.refit(resid, spread, snr_bin, np.zeros_like(resid)) == [None, None, None]  # no val rows
    sigma = calibration(torch.from_numpy(spread).float(), torch.from_numpy(snr_bin), torch.zeros(n, 3)).double().numpy()
    z = np.abs(resid / sigma).T
    for label in range(3):
        assert 0.66 < np.mean(z[label] <= 1) < 0.70 and 0.94 < np.mean(z[label] <= 2) < 0.965
        assert calibration.scale[label].mean() == pytest.approx(c[label], rel=0.05)


def test_catalogue_columns_and_units_of_every_label(tmp_path):
    trainer = SimpleNamespace(
        world_size=1, global_rank=0, log_dir=None, default_root_dir=str(tmp_path), datamodule=None
    )
    n = 5
    values = {
        "row": torch.arange(n),
        "snr": torch.full((n,), 5.0),
        "snr_bin": torch.zeros(n, dtype=torch.long),
        "weights": torch.softmax(torch.randn(n, 2, 3), -1),
        "expert_preds": torch.randn(n, 3, 2),
        "n_masked": torch.zeros(n, dtype=torch.long),
        "ood_score": torch.ones(n),
        "flags": torch.zeros(n, dtype=torch.long),
    }
    for name in ("log_g", "T_eff"):
        values |= {f"{name}_{s}": torch.randn(n) for s in ("pred", "sigma", "true")}
        values[f"{name}_edge"] = torch.zeros(n, dtype=torch.bool)
    values["rho_log_g_T_eff"] = torch.full((n,), -0.25)
    for routing, weights in (("per_label", ["w_log_g_a", "w_log_g_b", "w_log_g_c", "w_T_eff_a"]), ("shared", ["w_a"])):
        experts = SimpleNamespace(names=["a", "b", "c"])
        mixture = SimpleNamespace(
            experts=experts, labels=("log_g", "T_eff"), routing=routing, correlation_names=["rho_log_g_T_eff"]
        )
        module = SimpleNamespace(mixture=mixture)
        writer = CatalogueWriter(str(tmp_path / f"{routing}.csv"))
        writer.on_predict_start(trainer, module)
        writer.write_on_batch_end(trainer, module, values, None, None, 0)
        writer.on_predict_end(trainer, module)
        cat = pd.read_csv(tmp_path / f"{routing}.csv")
        names = ["T_eff_pred", "T_eff_sigma", "T_eff_true", "pred_T_eff_c", "pred_log_g_a", *weights]
        assert set(names) <= set(cat.columns), sorted(cat.columns)
        # each pair's error correlation follows the sigmas
        assert list(cat.columns[5:8]) == ["T_eff_pred", "T_eff_sigma", "rho_log_g_T_eff"]
        assert (cat["rho_log_g_T_eff"] == -0.25).all()
        np.testing.assert_allclose(cat["pred_T_eff_c"], values["expert_preds"][:, 2, 1].numpy(), rtol=1e-5)
    assert "w_b" not in cat or routing == "shared"
    assert column_meta("T_eff_sigma")[0] == "K" and column_meta("pred_T_eff_c") == (
        "K",
        "effective temperature predicted by expert c",
    )
    assert column_meta("M_H_pred")[0] == "dex" and column_meta("w_M_H_Cool-Poor")[1].endswith("for M_H")
    assert column_meta("rho_log_g_M_H") == (
        "",
        "correlation of the errors of log_g_pred and M_H_pred (per SNR bin, from the predicted labels)",
    )


def test_summary_table_of_a_label_reads_its_own_names():
    metrics = {
        "test/r2": 0.7,
        "test/r2_log_g": 0.7,
        "test/r2_T_eff": 0.9,
        "test/r2_snr_X_T_eff": 0.4,
        "test/rho_T_eff": 1.1,
    }
    text = summary_table(metrics, label="T_eff")
    assert "0.9000" in text and "0.4000" in text and "rho = 1.100" in text and "0.7000" not in text
    assert "no spectra in this bin" in text.splitlines()[2]  # SNR H: none logged for T_eff


def test_each_label_gate_learns_from_its_own_label_only(dm, one_label):
    """Per-label routing: log g's gate network gets the gradient of log g's error alone (what keeps a 3-label
    gate's log g as good as a log-g-only gate's), T_eff's the gradient of T_eff's."""
    model = _model(dm, _prepared(one_label))
    batch = noisy_batch(dm, 64)

    def grads(b, label):  # of label's network: its slice of every grouped tensor
        model.zero_grad()
        model._loss(model(b), b)["mse"].backward()
        return [p.grad[label].clone() for p in model.mixture.gate.parameters()]

    moved = batch | {"T_eff": batch["T_eff"] + 500.0}
    assert all(torch.equal(a, b) for a, b in zip(grads(batch, 0), grads(moved, 0)))
    assert not all(torch.equal(a, b) for a, b in zip(grads(batch, 1), grads(moved, 1)))


LEARNED = [f for f in FUSIONS if isinstance(build_gate(f, 13, 10, 1 if f == "global" else 9), LearnedGate)]


@pytest.mark.parametrize("fusion", LEARNED)
def test_grouped_gate_is_one_separate_gate_per_label(fusion):
    """Per-label routing's gate (every layer the L networks' weights [L, out, in], one batched product) against L
    one-network gates built one after the other from the same seed (torch's nn.Linear layers): the same weights,
    the same gate weights (and tau) out, the same gradients; a label's loss moves its own network alone."""
    torch.manual_seed(3)
    grouped = build_gate(fusion, 13, 10, 9, groups=3).double()
    torch.manual_seed(3)
    separate = [build_gate(fusion, 13, 10, 9).double() for _ in LABELS]
    assert [n for n, _ in grouped.named_parameters()] == [n for n, _ in separate[0].named_parameters()]
    for label, gate in enumerate(separate):
        for (name, p), ref in zip(grouped.named_parameters(), gate.parameters()):
            assert torch.equal(p[label], ref), f"{name} of label {label}"
    with torch.no_grad():  # the exponents away from their start, each label's its own
        for label, gate in enumerate(separate):
            for name, p in gate.named_parameters():
                if name.startswith("raw_"):
                    p.fill_(0.3 * label - 0.2)
                    dict(grouped.named_parameters())[name][label] = p
    g = torch.Generator().manual_seed(0)
    phys, qual = torch.randn(64, 13, generator=g, dtype=torch.float64), torch.randn(64, 10, generator=g).double()
    out, refs = grouped(phys, qual), [gate(phys, qual) for gate in separate]
    assert out.weights.shape == (64, 3, 9)
    ref_weights = torch.cat([r.weights for r in refs], 1)
    torch.testing.assert_close(out.weights, ref_weights, rtol=1e-12, atol=1e-14)
    if fusion == "temperature":
        torch.testing.assert_close(out.tau, torch.stack([r.tau for r in refs], 1), rtol=1e-12, atol=0)
    else:
        assert out.tau is None
    target = torch.rand(64, 3, 9, generator=g, dtype=torch.float64)
    scale = torch.tensor([1.0, 5.0, 0.2], dtype=torch.float64)[None, :, None]  # labels weighted differently
    ((out.weights - target).square() * scale).sum().backward()
    ((ref_weights - target).square() * scale).sum().backward()
    for label, gate in enumerate(separate):
        for (name, p), ref in zip(grouped.named_parameters(), gate.parameters()):
            torch.testing.assert_close(p.grad[label], ref.grad, rtol=1e-10, atol=1e-13, msg=f"{name} {label}")
    grouped.zero_grad()
    grouped(phys, qual).weights[:, 1].square().sum().backward()  # label 1's loss alone
    for name, p in grouped.named_parameters():
        assert p.grad[1].abs().sum() > 0 and not p.grad[0].any() and not p.grad[2].any(), name


def test_checkpoint_with_a_gate_module_per_label_tests_and_resumes_the_same(trained, tmp_path, capsys, recwarn):
    """A 3-label per-label checkpoint as moe saved it before the grouped layers -- label l's gate a module of its
    own (``mixture.gate.gates.<l>.net.0.weight`` [32, 23], ...), Adam's state per module (gate 0's six tensors,
    gate 1's, gate 2's, then the variance head's) -- tests to the same tables and resumes to the same weights as
    the same checkpoint in today's layout; neither command prints Lightning's note on the checkpoint folder."""
    root, args, best, _ = trained
    ckpt = read_checkpoint(best)
    state = ckpt["state_dict"]
    assert state["mixture.gate.net.0.weight"].shape == (3, 32, 23)
    gate = {k.removeprefix("mixture.gate."): v for k, v in state.items() if k.startswith("mixture.gate.")}
    modules = torch.nn.ModuleList(build_gate("concat", 13, 10, 9) for _ in LABELS)  # the earlier structure
    for label, module in enumerate(modules):
        module.load_state_dict({name: value[label] for name, value in gate.items()})
    earlier = {k: v for k, v in state.items() if not k.startswith("mixture.gate.")}
    earlier |= {f"mixture.gate.gates.{k}": v for k, v in modules.state_dict().items()}
    opt = ckpt["optimizer_states"][0]
    assert opt["param_groups"][0]["params"] == list(range(10))  # 6 gate tensors, 4 of the variance head
    moments = {}
    for label in range(3):
        for j in range(6):
            moments[6 * label + j] = {k: v if k == "step" else v[label] for k, v in opt["state"][j].items()}
    moments |= {18 + j: opt["state"][6 + j] for j in range(4)}
    earlier_opt = {"state": moments, "param_groups": [opt["param_groups"][0] | {"params": list(range(22))}]}
    paths = {"now": tmp_path / "now.ckpt", "earlier": tmp_path / "earlier.ckpt"}
    torch.save(ckpt, paths["now"])
    torch.save(ckpt | {"state_dict": earlier, "optimizer_states": [earlier_opt]}, paths["earlier"])

    tables, weights = {}, {}
    for name, path in paths.items():
        cli_main(["test", "--config", DUAL_TOWER_CONFIG, "--ckpt_path", str(path), *args])
        tables[name] = capsys.readouterr().out.split("\ntest log_g: ")[-1]
        out = tmp_path / name
        resumed = cli_main(
            ["fit", "--config", DUAL_TOWER_CONFIG, "--ckpt_path", str(path), *args]
            + ["--trainer.max_epochs", "2", "--trainer.default_root_dir", str(out)]
        )
        assert resumed.trainer.current_epoch == 2
        weights[name] = resumed.model.state_dict()
    assert "test M_H" in tables["now"] and tables["earlier"] == tables["now"]
    for key, value in weights["now"].items():
        if torch.is_tensor(value):
            assert torch.equal(weights["earlier"][key], value), key
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]
