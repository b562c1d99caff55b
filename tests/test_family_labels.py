"""A family fitted for only some labels (``FitConfig.family_labels``): the same experts as the every-label fit
for the labels it holds, a bundle that knows which, one error naming the family and the label it lacks, and
the cache key of every config without the setting as it was."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from moe.data.folder import SpectraFolder
from moe.experts.bundle import ExpertBundle, LabelNotFittedError, bundle_key, bundle_path, fit_bundle, wide_alpha_table
from moe.experts.evaluate import oracle_predictions
from moe.experts.fit import FitConfig
from moe.main import main
from moe.prepare import PrepareConfig, prepare

LABELS = ("log_g", "T_eff", "M_H")
BASE = FitConfig(("snr", "cells"), min_samples=10, block_rows=256)
# the cells for log g alone, the SNR experts for two labels out of order (kept in the fit's label order)
FEWER = replace(BASE, family_labels={"cells": "log_g", "snr": ("M_H", "log_g")})


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def folder(tiny_dir) -> SpectraFolder:
    return SpectraFolder(tiny_dir, block_rows=256, synth=None)


@pytest.fixture(scope="module")
def bundles(folder) -> tuple[ExpertBundle, ExpertBundle]:
    """(every family every label, ``FEWER``) on the tiny data."""
    return fit_bundle(folder, BASE, progress=False), fit_bundle(folder, FEWER, progress=False)


def test_a_family_fitted_for_fewer_labels_equals_the_every_label_fit(bundles):
    """Each (label, family) the smaller fit holds is the every-label fit's, closed to 1e-12 relative: weights,
    biases and the whole alpha path, the validation sums and the chosen alphas; it solves fewer systems."""
    every, fewer = bundles
    assert FEWER.family_labels == (("snr", ("log_g", "M_H")), ("cells", ("log_g",)))
    assert fewer.labels == LABELS and fewer.family_names == ("global", "phys", "snr", "cells")
    assert {f: fewer.family_labels(f) for f in fewer.family_names} == {
        "global": LABELS,
        "phys": LABELS,
        "snr": ("log_g", "M_H"),
        "cells": ("log_g",),
    }
    held = 0
    for label in LABELS:
        for fam in FEWER.families:
            if label not in FEWER.labels_of(fam):
                assert fam not in fewer.fits[label]
                continue
            a, b = fewer.family(fam, label), every.family(fam, label)
            np.testing.assert_array_equal(a.alpha, b.alpha, err_msg=f"{label} {fam}")
            for key in ("weight", "bias", "path_weight", "path_bias", "val_sse", "y_mean", "y_std"):
                assert _rel(getattr(a, key), getattr(b, key)) <= 1e-12, (label, fam, key)
            np.testing.assert_array_equal(a.n_train, b.n_train)
            held += 1
    assert held == 3 * 4 - 1 - 2  # snr without T_eff, the cells without T_eff and M_H
    # 9 alphas per label: snr 4 groups x 1 label fewer, cells 36 groups x 2 labels fewer
    assert every.timings["systems"] - fewer.timings["systems"] == 9 * (4 * 1 + 36 * 2)
    weight, bias = fewer.weights("snr")
    assert weight.shape[:2] == (4, 2) and bias.shape == (4, 2)
    np.testing.assert_array_equal(weight[:, 1], fewer.family("snr", "M_H").weight)


def test_a_short_group_of_a_family_for_fewer_labels_is_the_global_expert_of_those_labels(folder):
    """With ``fallback='global'`` a short SNR group of an SNR family fitted for [M/H] alone is the global expert's
    [M/H] (not its log g, the first label of the global expert), and the bundle lists it as a stand-in."""
    cfg = FitConfig(("snr",), min_samples=200, fallback="global", block_rows=256, family_labels={"snr": "M_H"})
    bundle = fit_bundle(folder, cfg, progress=False)
    snr, glob = bundle.family("snr", "M_H"), bundle.family("global", "M_H")
    short = [g for g, note in enumerate(snr.fallback) if note == "global"]
    assert short and len(short) < 4, snr.n_train  # SNR-X has 132 training rows of the tiny data
    for g in short:
        np.testing.assert_array_equal(snr.weight[g], glob.weight[0])
        assert snr.bias[g] == glob.bias[0] and snr.alpha[g] == glob.alpha[0]
    assert [(fam, name) for fam, name, _ in bundle.stand_ins() if fam == "snr"] == [
        ("snr", snr.names[g]) for g in short
    ]
    assert bundle.family_labels("snr") == ("M_H",)


def test_a_family_asked_for_a_label_it_was_not_fitted_for_is_one_error(bundles, folder, tmp_path):
    """The bundle's own lookup and a gate's preparation (``moe fit`` / the experiments) both stop with one line
    naming the family, the label and, in the preparation, the experts file."""
    fewer = bundles[1]
    with pytest.raises(LabelNotFittedError, match=r"the cells experts were fitted for log_g only, not T_eff"):
        fewer.family("cells", "T_eff")
    with pytest.raises(KeyError, match="label 'mag' was not fitted"):
        fewer.family("cells", "mag")
    path = fewer.save(bundle_path(folder, FEWER, tmp_path))  # the cache entry: prepare loads it, fits nothing
    cfg = PrepareConfig("cells", FEWER, experts_dir=str(tmp_path), feature_rows=64, labels=("log_g", "M_H"))
    with pytest.raises(LabelNotFittedError) as caught:
        prepare(folder, cfg, progress=False)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: the cells experts were fitted for log_g only, not M_H")
    assert "FitConfig.family_labels" in message


def test_the_cache_key_of_a_config_without_the_setting_is_unchanged():
    """Keys as the code before ``family_labels`` made them (so no cached bundle of a user is refitted); a family
    given every label is the default, and a smaller label set is a key of its own."""
    fingerprint = {"train": "x", "val": "y"}
    assert "family_labels" not in FitConfig().key_dict()
    assert bundle_key(fingerprint, FitConfig()) == "fb3bc5844c8e"
    assert bundle_key(fingerprint, FitConfig(("cells",), labels=("log_g",), required=("global",))) == "f7473b7f0e44"
    assert bundle_key(fingerprint, FitConfig(("snr", "cells"), min_samples=50, labels=LABELS)) == "00a730ffcf1a"
    assert bundle_key(fingerprint, FitConfig(noise_mode="augment", alphas=(1.0, 2.0))) == "6d830b1c34d1"
    full = FitConfig(("snr", "cells"), family_labels={"phys": LABELS, "cells": ("M_H", "T_eff", "log_g")})
    assert full.family_labels == () and full.key_dict() == FitConfig(("snr", "cells")).key_dict()
    assert bundle_key(fingerprint, FEWER) != bundle_key(fingerprint, BASE)
    assert FEWER.key_dict()["family_labels"] == (("snr", ("log_g", "M_H")), ("cells", ("log_g",)))


@pytest.mark.parametrize(
    ("family_labels", "problem"),
    [
        ({"global": "log_g"}, "the global family is fitted for every label"),
        ({"phys": "log_g"}, "cells for T_eff, M_H need the phys family for T_eff, M_H too"),
        ({"cells": "v_los"}, "family_labels gives cells the label(s) ['v_los'], not among the fit's labels"),
        ({"phys": ()}, "family_labels gives phys no label"),
        ((("snr", "log_g"), ("snr", "M_H")), "family_labels names family 'snr' twice"),
    ],
)
def test_a_label_set_that_cannot_be_fitted_is_refused(family_labels, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        FitConfig(("snr", "cells"), family_labels=family_labels)
    with pytest.raises(ValueError, match=re.escape("family_labels names family 'cells', which is not fitted")):
        FitConfig(("snr",), family_labels={"cells": "log_g"})


def test_the_bundle_round_trips_and_reports_per_label(bundles, folder, tmp_path):
    """Saved and loaded with the config check, the bundle keeps which labels each family holds; the alpha
    table leaves the labels a family lacks empty, and the oracle report of a label routes the families that have it."""
    fewer = bundles[1]
    path = fewer.save(tmp_path / "experts.pt")
    back = ExpertBundle.load(path, folder.fingerprint(), FEWER)
    assert back.config == FEWER and back.key == fewer.key
    assert {f: back.family_labels(f) for f in back.family_names} == {f: fewer.family_labels(f) for f in FEWER.families}
    np.testing.assert_array_equal(back.family("cells", "log_g").weight, fewer.family("cells", "log_g").weight)
    wide = wide_alpha_table(back.alpha_table())
    assert list(wide.index.get_level_values("family").unique()) == ["global", "phys", "snr", "cells"]
    assert wide.loc["cells", "alpha T_eff"].isna().all() and wide.loc["cells", "alpha log_g"].notna().all()
    assert wide.loc["snr", "alpha T_eff"].isna().all() and wide.loc["snr", "alpha M_H"].notna().all()
    assert set(oracle_predictions(folder, back, "val", label="T_eff").pred) == {"global", "phys"}
    assert set(oracle_predictions(folder, back, "val", label="M_H").pred) == {"global", "phys", "snr"}


def test_moe_experts_fit_and_report_with_family_labels(tiny_dir, tmp_path, capsys):
    """``--family-labels cells=log_g``: the fit's table and the report per label, the cells only under log g;
    a value that is no FAMILY=LABELS pair, or one the fit cannot make, is one line naming the flag."""
    out = str(tmp_path / "experts.pt")
    args = ["--data", tiny_dir, "--groups", "snr,cells", "--min-samples", "10", "--out", out]
    assert main(["experts", "fit", *args, "--family-labels", "cells=log_g"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^cells\s+Cool-Poor/SNR-X", table, re.M), table
    assert main(["experts", "report", *args, "--family-labels", "cells=log_g"]) == 0
    report = capsys.readouterr().out
    sections = re.split(r"^(?=\w+: oracle-routed)", report, flags=re.M)[1:]
    assert [s.split(":")[0] for s in sections] == list(LABELS)
    assert "cells" in sections[0].splitlines()[1] and all("cells" not in s.splitlines()[1] for s in sections[1:])
    bundle = ExpertBundle.load(out)
    assert bundle.family_labels("cells") == ("log_g",) and bundle.family_labels("snr") == LABELS
    for value, problem in (
        ("cells", "--family-labels 'cells': expected FAMILY=LABEL[,LABEL...]"),
        ("global=log_g", "--family-labels: the global family is fitted for every label"),
    ):
        assert main(["experts", "fit", *args, "--family-labels", value]) == 2
        assert problem in capsys.readouterr().err
    alphas = pd.read_csv(tmp_path / "experts.alphas.csv")
    assert list(alphas[alphas.family == "cells"].label.unique()) == ["log_g"]
    assert list(alphas[alphas.family == "snr"].label.unique()) == list(LABELS)
