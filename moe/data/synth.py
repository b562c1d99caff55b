r"""Synthetic PFS MR spectra in the pfsspec shard layout: the embedded default dataset.

A stand-in for BOSZ model atmospheres observed through the PFS medium-resolution arm.
It is not a radiative-transfer code; it is a documented, deterministic
model that carries the physics the experiments probe.

Labels (uniform, independent)
    T_eff in [3750, 6000] K, log g in [1, 5], M_H in [-2, 0.5], mag (i) in [20.5, 22.5],
    a_M = C_M = redshift = 0. Per-star observing conditions: seeing in [0.5, 1.5]",
    airmass in [1.0, 1.6], sky continuum scale s_sky ~ logN(0, 0.25), OH strength
    s_OH ~ logN(0, 0.3), fibre/field throughput eta_field in [0.75, 1.0], telluric
    correction residual r_tell in [0.03, 0.20]. These nuisance columns are stored in the
    parameter table next to the contract columns. ``moe data synth --teff LO HI`` (``--log-g``,
    ``--m-h``; :class:`SynthConfig` ``teff_range`` ...) draws a label from another range: stars
    outside the training labels, which ``predict`` takes and a training run refuses.

Wavelength grid
    D = 4096 output pixels on 7100-8850 A, non-uniform: ``wave = 7100 (8850/7100)^x``,
    ``x = u + 0.03 u (1-u)``, ``u`` uniform in [0, 1] (about 0.41-0.45 A per pixel).
    The model is computed on an internal log-uniform grid of 8192 points over
    7050-8900 A (0.21 A per point) and mapped to the output grid by one sparse operator
    that applies the line-spread function (Gaussian, R = lambda / FWHM = 5000) and the
    pixel box (added in quadrature as width^2 / 12), then median-normalised.

Flux
    ``F(lambda) = B_lambda(T_eff) * LSF[exp(-tau(lambda))]``, ``tau = sum_k c_k(labels) P_k(lambda)``
    (the smooth blackbody is applied after the LSF, on the output grid).
    Each basis profile ``P_k`` is a fixed family of lines sharing one label dependence:
    a Gaussian core (intrinsic sigma 0.35 A, 1.5 A for Paschen) or a Lorentzian damping
    wing (half-width gamma, truncated at +-60 A). Because the strength enters through
    ``exp(-tau)`` and the LSF is applied afterwards, strong lines saturate and follow a
    curve of growth: the observed flux depends non-linearly on the labels.
    With ``theta = 5040 / T_eff``, ``g = log g - 3``, ``m = M_H`` and the "coolness"
    ``kappa = 1 / (1 + exp((T_eff - 4300) / 250))``, the coefficients are:

    ===================  ========================================  ==========================================
    family               lines (air, A; relative gf)               central optical depth c_k
    ===================  ========================================  ==========================================
    Ca II triplet core   8498.02 (.30) 8542.09 (1) 8662.14 (.70)   5.0 * 10^(0.45 m) * (1 - 0.16 g) * (1 + 0.3 (theta - 1))
    Ca II triplet wing   same, gamma 2.5 A                         0.35 * 10^(0.5 m) * 10^(0.42 g)
    Na I core            8183.26 (.80) 8194.79 (1)                 1.6 * 10^(0.5 m) * exp(-(T_eff - 3750) / 550) * 10^(0.3 g)
    Na I wing            same, gamma 3 A                           0.6 * kappa * 10^(0.5 m) * 10^(0.55 g)
    K I core             7664.90 (1) 7698.96 (.70)                 2.5 * 10^(0.5 m) * exp(-(T_eff - 3750) / 650) * 10^(0.25 g)
    K I wing             same, gamma 2 A                           0.4 * kappa * 10^(0.5 m) * 10^(0.5 g)
    Mg I core            8806.76 (1) 8717.83 (.30) 8736.02 (.45)   1.4 * 10^(0.8 m) * 10^(0.15 g) * (1.3 - 0.3 theta)
    Mg I wing            8806.76, gamma 2 A                        0.12 * 10^(0.8 m) * 10^(0.45 g)
    Fe I, low chi        8514.07 8611.80 8674.75 8688.62 8824.22   1.3 * 10^m * 10^(-2.2 (theta - 0.9)) * P(g)
                         + 40 fixed weak lines (chi ~ 2.2 eV)
    Fe I, high chi       30 fixed weak lines (chi ~ 4.5 eV)        0.5 * 10^m * 10^(-4.5 (theta - 0.9)) * P(g)
    Ti I                 8434.96 + 25 fixed weak lines (chi ~ 1 eV) 0.8 * 10^m * kappa^0.7 * 10^(-1.0 (theta - 0.9))
    ionised metals       25 fixed weak lines (Fe II / Ti II-like)  0.5 * 10^m * 10^(-0.33 g) * exp((T_eff - 5000) / 900)
    TiO bands            heads 7053 7589 7666 8432 8442 8859,      3.0 * kappa^1.6 * 10^(0.4 m) * (1 + 0.08 g)
                         red-degraded (e-fold 45 A), ro-vibrational
                         texture (fixed random comb)
    CN band              7875-8100, 60 fixed weak lines            0.8 * 10^(0.7 m) / (1 + exp((log g - 2.6) / 0.35)) * exp(-((T_eff - 4600) / 800)^2)
    Paschen core         8502.5 8545.4 8598.4 8665.0 8750.5 8862.8 0.5 * exp((T_eff - 6000) / 350) * (1 - 0.2 g)
    Paschen wing         same, gamma 6 A                           0.1 * exp((T_eff - 6000) / 350) * 10^(0.2 g)
    telluric O2 A band   7594-7700, fixed comb                     r_tell * airmass   (residual after correction)
    telluric H2O         7160-7340, 8130-8350, fixed comb          r_tell * airmass * 0.6
    ===================  ========================================  ==========================================

    ``P(g) = 10^(g (0.25 kappa - 0.12 (1 - kappa)))``: neutral lines strengthen with gravity in
    cool dwarfs (pressure-broadened wings, H- opacity) and weaken with it in warmer stars
    (ionisation), so the same pixels respond to log g with opposite signs across T_eff bins.
    The "fixed weak lines" are drawn once from ``numpy.random.default_rng(20251228)`` (wavelength
    uniform in 7100-8850 A, relative gf log-uniform over two decades) and are the same for every
    dataset. These terms give the label interactions the experiments need: log g shows
    in Na I / K I / TiO for cool stars, in CaT wings, Mg I and ionised lines for warmer,
    metal-rich stars, and hardly at all in metal-poor stars, whose lines are weak.

Error (1 sigma, in units of the median-normalised flux)
    Counts per pixel over 12 x 900 s, with ``A = N0 10^(-0.4 (mag - 20)) T_inst(lambda)
    T_atm(lambda) eta_fib eta_field``:
    star ``S = A F_norm``; sky ``B = N0 10^(-0.4 (mu_sky - 20)) Omega T_inst(lambda) airmass^0.6
    [s_sky (lambda/8000)^1.5 + s_OH OH(lambda)]``; dark + read ``V_dr = 12 (900 s * 0.003 e/s * 4 +
    4 * 3^2)``. ``error = sqrt(S + B + V_dr) / A``. Constants: N0 = 19200 e per pixel at mag 20,
    mu_sky = 19.8 mag / arcsec^2, Omega = pi 0.575^2 arcsec^2 (fibre), T_inst a smooth
    curve peaking at 7950 A with a red CCD roll-off, T_atm = exp(-airmass tau_tell) with
    the full telluric depth, eta_fib = 1 - exp(-0.575^2 / (2 sigma^2)), sigma = seeing / 2.3548.
    OH(lambda) is a fixed list of 160 emission lines (7200-8850 A, LSF-broadened, relative
    strengths log-uniform over 2.2 decades). Because the photon term follows the flux,
    the error vector carries the spectrum's shape; the nuisances make its aggregate
    statistics nearly blind to log g.

Where it is written
    :func:`create_dataset` makes a *new* folder, whole: it generates into a sibling
    ``.<name>.partial`` folder under a file lock (an interrupted run resumes there, keeping the
    shards already written), writes the ``synth.json`` manifest last and renames the folder into
    place. A folder that exists is never generated into. :func:`write_dataset` is the
    low-level writer of the shards and manifest into a given folder.

Command line::

    moe data synth --out DIR --train N --val N --test N --shard-size N --seed S
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from filelock import FileLock
from tqdm.auto import tqdm

from moe.data.shards import SHARD_FILE, ShardWriter
from moe.shared.arguments import PositiveInt, ToolArgumentError, ToolParser, run_tool
from moe.shared.atomic import ensure_space, write_text
from moe.shared.errors import ShardError, WriteError, reason

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
WAVE_MIN, WAVE_MAX = 7100.0, 8850.0
RESOLUTION = 5000.0
N_MODEL = 8192
MODEL_MIN, MODEL_MAX = 7050.0, 8900.0
LINE_LIST_SEED = 20251228
MANIFEST = "synth.json"

LABEL_RANGES = {
    "T_eff": (3750.0, 6000.0),
    "log_g": (1.0, 5.0),
    "M_H": (-2.0, 0.5),
    "mag": (20.5, 22.5),
    "seeing": (0.5, 1.5),
    "airmass": (1.0, 1.6),
}

# Error-model constants (see module docstring).
N0 = 19200.0
MU_SKY = 19.8
FIBRE_RADIUS = 0.575
V_DARK_READ = 12 * (900 * 0.003 * 4 + 4 * 3.0**2)

CAT = (8498.02, 8542.09, 8662.14)
NA = (8183.26, 8194.79)
KI = (7664.90, 7698.96)
MG = (8806.76, 8717.83, 8736.02)
FE_NAMED = (8514.07, 8611.80, 8674.75, 8688.62, 8824.22)
TI_NAMED = (8434.96,)
TIO_HEADS = (7053.0, 7589.0, 7666.0, 8432.0, 8442.0, 8859.0)
PASCHEN = (8502.5, 8545.4, 8598.4, 8665.0, 8750.5, 8862.8)

BASIS = (
    "cat_core",
    "cat_wing",
    "na_core",
    "na_wing",
    "k_core",
    "k_wing",
    "mg_core",
    "mg_wing",
    "fe_low",
    "fe_high",
    "ti",
    "ion",
    "tio",
    "cn",
    "pa_core",
    "pa_wing",
    "tell_o2",
    "tell_h2o",
)


def make_wave(n_pixels: int = 4096) -> np.ndarray:
    """The non-uniform output grid [D] in Angstrom (strictly increasing, 7100-8850)."""
    u = np.linspace(0.0, 1.0, n_pixels)
    x = u + 0.03 * u * (1.0 - u)
    return WAVE_MIN * (WAVE_MAX / WAVE_MIN) ** x


def _gauss(x: np.ndarray, centres: Sequence[float], weights: Sequence[float], sigma: float) -> np.ndarray:
    out = np.zeros_like(x)
    for c, w in zip(centres, weights):
        m = np.abs(x - c) < 8 * sigma
        out[m] += w * np.exp(-0.5 * ((x[m] - c) / sigma) ** 2)
    return out


def _lorentz(
    x: np.ndarray, centres: Sequence[float], weights: Sequence[float], gamma: float, cut: float = 60.0
) -> np.ndarray:
    out = np.zeros_like(x)
    floor = gamma**2 / (cut**2 + gamma**2)
    for c, w in zip(centres, weights):
        m = np.abs(x - c) < cut
        out[m] += w * (gamma**2 / ((x[m] - c) ** 2 + gamma**2) - floor) / (1 - floor)
    return out


@dataclass(frozen=True)
class FixedLists:
    """Line lists drawn once from a fixed seed (identical for every dataset)."""

    fe_low: np.ndarray
    fe_high: np.ndarray
    ti: np.ndarray
    ion: np.ndarray
    cn: np.ndarray
    tio_comb: np.ndarray
    o2: np.ndarray
    h2o: np.ndarray
    oh: np.ndarray

    @staticmethod
    def draw() -> FixedLists:
        rng = np.random.default_rng(LINE_LIST_SEED)

        def lines(n, lo=WAVE_MIN, hi=WAVE_MAX, decades=2.0):
            return np.column_stack([rng.uniform(lo, hi, n), 10 ** rng.uniform(-decades, 0, n)])

        h2o = np.vstack([lines(70, 7160, 7340, 1.5), lines(90, 8130, 8350, 1.5)])
        o2 = lines(90, 7594, 7700, 1.0)
        o2[:, 1] *= np.exp(-(o2[:, 0] - 7594) / 60.0)  # A band: strongest near the head
        return FixedLists(
            fe_low=lines(40),
            fe_high=lines(30),
            ti=lines(25),
            ion=lines(25),
            cn=lines(60, 7875, 8100, 1.0),
            tio_comb=lines(400, 7053, 8900, 1.0),
            o2=o2,
            h2o=h2o,
            oh=lines(160, 7200, 8850, 2.2),
        )


class SpectrumModel:
    """Noise-free spectra and their error vectors on the output grid.

    ``flux(labels)`` -> [B, D] median-normalised; ``error(flux, labels)`` -> [B, D].
    All fixed ingredients (basis profiles, sparse LSF operator, sky and throughput
    templates) are built once per instance.
    """

    def __init__(self, n_pixels: int = 4096):
        self.wave = make_wave(n_pixels)
        self.lists = FixedLists.draw()
        self.model_wave = np.geomspace(MODEL_MIN, MODEL_MAX, N_MODEL)

    # ---- fixed ingredients -------------------------------------------------
    @cached_property
    def basis(self) -> np.ndarray:
        """Line-profile basis [K, N_MODEL] (float32), rows in the order of ``BASIS``."""
        x, L = self.model_wave, self.lists
        core, pa = 0.35, 1.5
        rows = {
            "cat_core": _gauss(x, CAT, (0.30, 1.0, 0.70), core),
            "cat_wing": _lorentz(x, CAT, (0.30, 1.0, 0.70), 2.5),
            "na_core": _gauss(x, NA, (0.80, 1.0), core),
            "na_wing": _lorentz(x, NA, (0.80, 1.0), 3.0),
            "k_core": _gauss(x, KI, (1.0, 0.70), core),
            "k_wing": _lorentz(x, KI, (1.0, 0.70), 2.0),
            "mg_core": _gauss(x, MG, (1.0, 0.30, 0.45), core),
            "mg_wing": _lorentz(x, MG[:1], (1.0,), 2.0),
            "fe_low": _gauss(x, FE_NAMED, (0.6,) * 5, core) + _gauss(x, L.fe_low[:, 0], L.fe_low[:, 1] * 0.5, core),
            "fe_high": _gauss(x, L.fe_high[:, 0], L.fe_high[:, 1], core),
            "ti": _gauss(x, TI_NAMED, (0.8,), core) + _gauss(x, L.ti[:, 0], L.ti[:, 1] * 0.6, core),
            "ion": _gauss(x, L.ion[:, 0], L.ion[:, 1], core),
            "tio": self._tio(x),
            "cn": _gauss(x, L.cn[:, 0], L.cn[:, 1] * 0.5, core),
            "pa_core": _gauss(x, PASCHEN, (1.0,) * 6, pa),
            "pa_wing": _lorentz(x, PASCHEN, (1.0,) * 6, 6.0),
            "tell_o2": _gauss(x, L.o2[:, 0], L.o2[:, 1] * 2.0, 0.3),
            "tell_h2o": _gauss(x, L.h2o[:, 0], L.h2o[:, 1], 0.3),
        }
        return np.stack([rows[k] for k in BASIS]).astype(np.float32)

    def _tio(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros_like(x)
        for head in TIO_HEADS:
            m = x >= head
            out[m] += np.exp(-(x[m] - head) / 45.0)
        texture = _gauss(x, self.lists.tio_comb[:, 0], self.lists.tio_comb[:, 1], 0.4)
        return out * (0.7 + 0.6 * texture / max(texture.max(), 1e-9))

    @cached_property
    def lsf(self) -> sp.csr_matrix:
        """Sparse [D, N_MODEL] operator: Gaussian LSF (R=5000) and pixel box, rows sum to 1."""
        lnx = np.log(self.model_wave)
        lnw = np.log(self.wave)
        width = np.gradient(lnw)
        sigma = np.sqrt((1.0 / (RESOLUTION * 2.3548)) ** 2 + width**2 / 12.0)
        step = lnx[1] - lnx[0]
        half = int(np.ceil(4.5 * sigma.max() / step)) + 1
        centre = np.searchsorted(lnx, lnw)
        cols = centre[:, None] + np.arange(-half, half + 1)[None, :]
        cols = np.clip(cols, 0, N_MODEL - 1)
        w = np.exp(-0.5 * ((lnx[cols] - lnw[:, None]) / sigma[:, None]) ** 2)
        w /= w.sum(axis=1, keepdims=True)
        rows = np.repeat(np.arange(lnw.size), cols.shape[1])
        mat = sp.csr_matrix((w.ravel(), (rows, cols.ravel())), shape=(lnw.size, N_MODEL))
        mat.sum_duplicates()
        return mat.astype(np.float32)

    @cached_property
    def telluric_depth(self) -> np.ndarray:
        """Full (uncorrected) telluric optical depth at airmass 1 on the output grid [D]."""
        k = BASIS.index("tell_o2")
        tau = 2.5 * self.basis[k] + 1.2 * self.basis[k + 1]
        trans = self.lsf @ np.exp(-tau.astype(np.float64))
        return -np.log(np.clip(trans, 1e-4, 1.0)) + 0.05  # plus a grey 0.05 extinction

    @cached_property
    def throughput(self) -> np.ndarray:
        """Instrument throughput T_inst on the output grid [D] (fibre to detector, QE)."""
        w = self.wave
        return 0.32 * np.exp(-0.5 * ((w - 7950.0) / 1100.0) ** 2) * (1.0 - 0.55 / (1.0 + np.exp(-(w - 8650.0) / 90.0)))

    @cached_property
    def oh(self) -> np.ndarray:
        """OH emission template on the output grid [D], in units of the sky continuum per pixel."""
        sigma = self.wave.mean() / (RESOLUTION * 2.3548)
        lines = self.lists.oh
        return _gauss(self.wave, lines[:, 0], lines[:, 1] * 40.0, sigma)

    # ---- per-star quantities -----------------------------------------------
    @staticmethod
    def coefficients(labels: pd.DataFrame) -> np.ndarray:
        """Basis coefficients [B, K] from labels (formulas in the module docstring)."""
        t = labels["T_eff"].to_numpy(np.float64)
        g = labels["log_g"].to_numpy(np.float64) - 3.0
        m = labels["M_H"].to_numpy(np.float64)
        theta = 5040.0 / t
        kappa = 1.0 / (1.0 + np.exp((t - 4300.0) / 250.0))
        r_tell = labels["r_tell"].to_numpy(np.float64) * labels["airmass"].to_numpy(np.float64)
        c = {
            "cat_core": 5.0 * 10 ** (0.45 * m) * (1 - 0.16 * g) * (1 + 0.3 * (theta - 1)),
            "cat_wing": 0.35 * 10 ** (0.5 * m) * 10 ** (0.42 * g),
            "na_core": 1.6 * 10 ** (0.5 * m) * np.exp(-(t - 3750.0) / 550.0) * 10 ** (0.3 * g),
            "na_wing": 0.6 * kappa * 10 ** (0.5 * m) * 10 ** (0.55 * g),
            "k_core": 2.5 * 10 ** (0.5 * m) * np.exp(-(t - 3750.0) / 650.0) * 10 ** (0.25 * g),
            "k_wing": 0.4 * kappa * 10 ** (0.5 * m) * 10 ** (0.5 * g),
            "mg_core": 1.4 * 10 ** (0.8 * m) * 10 ** (0.15 * g) * (1.3 - 0.3 * theta),
            "mg_wing": 0.12 * 10 ** (0.8 * m) * 10 ** (0.45 * g),
            "fe_low": 1.3 * 10**m * 10 ** (-2.2 * (theta - 0.9)) * 10 ** (g * (0.25 * kappa - 0.12 * (1 - kappa))),
            "fe_high": 0.5 * 10**m * 10 ** (-4.5 * (theta - 0.9)) * 10 ** (g * (0.25 * kappa - 0.12 * (1 - kappa))),
            "ti": 0.8 * 10**m * kappa**0.7 * 10 ** (-1.0 * (theta - 0.9)),
            "ion": 0.5 * 10**m * 10 ** (-0.33 * g) * np.exp((t - 5000.0) / 900.0),
            "tio": 3.0 * kappa**1.6 * 10 ** (0.4 * m) * (1 + 0.08 * g),
            "cn": 0.8 * 10 ** (0.7 * m) / (1 + np.exp((g + 3.0 - 2.6) / 0.35)) * np.exp(-(((t - 4600.0) / 800.0) ** 2)),
            "pa_core": 0.5 * np.exp((t - 6000.0) / 350.0) * (1 - 0.2 * g),
            "pa_wing": 0.1 * np.exp((t - 6000.0) / 350.0) * 10 ** (0.2 * g),
            "tell_o2": r_tell,
            "tell_h2o": 0.6 * r_tell,
        }
        return np.column_stack([c[k] for k in BASIS]).astype(np.float32)

    def flux(self, labels: pd.DataFrame) -> np.ndarray:
        """Noise-free, median-normalised flux [B, D] (float32)."""
        tau = self.coefficients(labels) @ self.basis  # [B, N_MODEL]
        np.negative(tau, out=tau)
        np.exp(tau, out=tau)
        out = np.ascontiguousarray(self.lsf.dot(tau.T).T, dtype=np.float32)
        out *= self.planck(labels["T_eff"].to_numpy(np.float64))
        out /= np.median(out, axis=1, keepdims=True)
        return out

    def planck(self, teff: np.ndarray) -> np.ndarray:
        """Blackbody continuum B_lambda(T_eff) on the output grid [B, D] (float32, arbitrary scale).

        Applied after the LSF: the continuum varies on scales of hundreds of Angstrom, so
        convolving the product or the lines alone differs by < 1e-4.
        """
        x = self.wave[None, :] * 1e-8  # cm
        b = 1.0 / (x / 7.5e-5) ** 5 / np.expm1(1.4387769 / (x * np.asarray(teff, np.float64)[:, None]))
        return b.astype(np.float32)

    @cached_property
    def _sky_templates(self) -> tuple[np.ndarray, np.ndarray]:
        """Sky continuum and OH per-pixel templates times T_inst (float32 [D] each)."""
        omega = np.pi * FIBRE_RADIUS**2
        k = N0 * 10 ** (-0.4 * (MU_SKY - 20.0)) * omega * self.throughput
        return ((k * (self.wave / 8000.0) ** 1.5).astype(np.float32), (k * self.oh).astype(np.float32))

    def error(self, flux: np.ndarray, labels: pd.DataFrame) -> np.ndarray:
        """1-sigma error [B, D] (float32) from the photon + sky + dark + read model."""
        col = lambda k: labels[k].to_numpy(np.float64)[:, None]  # noqa: E731
        airmass = col("airmass")
        sig = col("seeing") / 2.3548
        eta_fib = 1.0 - np.exp(-(FIBRE_RADIUS**2) / (2 * sig**2))
        star = (N0 * 10 ** (-0.4 * (col("mag") - 20.0)) * eta_fib * col("eta_field")).astype(np.float32)
        # A = star * T_inst * T_atm: counts per unit normalised flux, per pixel
        a = np.multiply(-airmass.astype(np.float32), self.telluric_depth.astype(np.float32)[None, :])
        np.exp(a, out=a)
        a *= self.throughput.astype(np.float32)[None, :]
        a *= star
        cont, oh = self._sky_templates
        am = (airmass**0.6).astype(np.float32)
        var = (col("s_sky").astype(np.float32) * am) * cont[None, :]
        var += (col("s_oh").astype(np.float32) * am) * oh[None, :]
        var += np.float32(V_DARK_READ)
        var += a * flux
        np.sqrt(var, out=var)
        var /= a
        return var


def sample_labels(
    rng: np.random.Generator, n: int, ranges: dict[str, tuple[float, float]] | None = None
) -> pd.DataFrame:
    """Labels and observing conditions of ``n`` stars (columns of the parameter table); ``ranges`` replaces
    entries of :data:`LABEL_RANGES` (stars outside the training labels, to test what a catalogue says of them)."""
    bounds = {**LABEL_RANGES, **(ranges or {})}
    u = lambda k: rng.uniform(*bounds[k], n)  # noqa: E731
    df = pd.DataFrame(
        {
            "T_eff": u("T_eff"),
            "log_g": u("log_g"),
            "M_H": u("M_H"),
            "a_M": np.zeros(n),
            "C_M": np.zeros(n),
            "mag": u("mag"),
            "redshift": np.zeros(n),
            "seeing": u("seeing"),
            "airmass": u("airmass"),
            "s_sky": np.exp(rng.normal(0.0, 0.25, n)),
            "s_oh": np.exp(rng.normal(0.0, 0.3, n)),
            "eta_field": rng.uniform(0.75, 1.0, n),
            "r_tell": rng.uniform(0.03, 0.20, n),
        }
    )
    return df


def generate(model: SpectrumModel, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """``n`` spectra in memory: (flux [n, D], error [n, D], params). For tests and checks."""
    labels = sample_labels(rng, n)
    flux = model.flux(labels)
    error = model.error(flux, labels)
    labels.insert(7, "snr", np.linalg.norm(flux, axis=1) / np.linalg.norm(error, axis=1))
    return flux, error, labels


@dataclass(frozen=True)
class SynthConfig:
    """Size and seed of a generated dataset (the default of every config)."""

    n_train: int = 50_000
    n_val: int = 5_000
    n_test: int = 20_000
    shard_size: int = 10_000
    n_pixels: int = 4096
    seed: int = 42
    # label ranges other than LABEL_RANGES (None: the standard one). Rows outside [3750, 6000] K, log g [1, 5] or
    # [M/H] [-2, 0.5] cannot train a model (the row check refuses them); ``predict`` takes them.
    teff_range: tuple[float, float] | None = None
    log_g_range: tuple[float, float] | None = None
    m_h_range: tuple[float, float] | None = None

    def label_ranges(self) -> dict[str, tuple[float, float]]:
        """The label ranges that differ from :data:`LABEL_RANGES`."""
        pairs = (("T_eff", self.teff_range), ("log_g", self.log_g_range), ("M_H", self.m_h_range))
        return {k: (float(v[0]), float(v[1])) for k, v in pairs if v is not None}


def shard_plan(cfg: SynthConfig) -> list[tuple[str, int, int]]:
    """(folder name, split id, rows) of every shard of the dataset."""
    plan = []
    for split_id, (split, n) in enumerate((("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test))):
        n_shards = max(1, -(-n // cfg.shard_size))
        for k in range(n_shards):
            rows = min(cfg.shard_size, n - k * cfg.shard_size)
            plan.append((f"{split}_{k:03d}", split_id, rows))
    return plan


def write_dataset(
    out: str | os.PathLike, cfg: SynthConfig = SynthConfig(), chunk: int = 1000, progress: bool = True
) -> Path:
    """Generate (or complete) the dataset in the folder ``out``; every shard is written atomically.

    Low-level: it writes into ``out`` whatever that folder is; the commands use :func:`create_dataset`.

    Deterministic per ``cfg.seed``: shard k of split s uses ``default_rng([seed, s, k])``.
    Existing shards are kept, so an interrupted run resumes where it stopped. A manifest
    ``synth.json`` is written last; its presence means the dataset is complete.
    """
    out = Path(out)
    manifest = out / MANIFEST
    expected = manifest_of(cfg)
    if manifest.is_file():
        found = json.loads(manifest.read_text())
        if found != expected:
            raise ValueError(
                f"{manifest}: dataset was generated with {found}, requested {expected}; use another --out folder"
            )
        return out
    model = SpectrumModel(cfg.n_pixels)
    plan = shard_plan(cfg)
    todo = [(name, sid, rows, k) for k, (name, sid, rows) in enumerate(plan) if not (out / name / SHARD_FILE).is_file()]
    total = sum(r for _, _, r, _ in todo)
    bar = tqdm(total=total, unit="spec", desc=f"synth -> {out}", disable=not progress)
    for name, split_id, rows, _ in todo:
        shard_index = int(name.rsplit("_", 1)[1])
        rng = np.random.default_rng([cfg.seed, split_id, shard_index])
        labels = sample_labels(rng, rows, cfg.label_ranges())
        snr = np.empty(rows)
        with ShardWriter(out / name / SHARD_FILE, model.wave, rows) as w:
            for start in range(0, rows, chunk):
                part = labels.iloc[start : start + chunk]
                flux = model.flux(part)
                error = model.error(flux, part)
                snr[start : start + len(part)] = np.linalg.norm(flux, axis=1) / np.linalg.norm(error, axis=1)
                w.write(start, flux, error)
                bar.update(len(part))
            params = labels.copy()
            params.insert(7, "snr", snr)
            w.set_params(params)
    bar.close()
    write_text(manifest, json.dumps(expected, indent=2), "the synthetic dataset's manifest")
    return out


def manifest_of(cfg: SynthConfig) -> dict:
    """The ``synth.json`` content of a dataset generated with ``cfg``."""
    ranges = ("teff_range", "log_g_range", "m_h_range")  # recorded only when set (older manifests lack them)
    return {
        "generator_version": GENERATOR_VERSION,
        **{k: list(v) if k in ranges else v for k, v in asdict(cfg).items() if not (k in ranges and v is None)},
    }


def read_manifest(root: str | os.PathLike) -> dict | None:
    """The manifest of a generated dataset folder, or None when the folder has none (not made by this project)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ShardError(path, f"unreadable synthetic-dataset manifest ({reason(exc)})") from exc


def dataset_bytes(cfg: SynthConfig) -> int:
    """Disk space of a generated dataset (flux and error in float32, plus the parameter tables), roughly."""
    rows = cfg.n_train + cfg.n_val + cfg.n_test
    return rows * (8 * cfg.n_pixels + 8 * 16) + len(shard_plan(cfg)) * 2**20


def create_dataset(
    root: str | os.PathLike, cfg: SynthConfig = SynthConfig(), chunk: int = 1000, progress: bool = True
) -> Path:
    """Generate a synthetic dataset as the new folder ``root``, whole and atomically (see module docstring).

    Returns ``root`` at once when it already exists with a manifest (made by this function, here or by
    a concurrent process; its settings may differ from ``cfg`` -- compare :func:`read_manifest`). A
    folder ``root`` without a manifest is not this project's: a :class:`ShardError`, nothing written.
    """
    root = Path(root)
    if not root.exists():
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WriteError(
                root.parent, f"cannot create the folder for the synthetic dataset ({reason(exc)})"
            ) from exc
        with FileLock(str(root.parent / f".{root.name}.lock")):
            if not root.exists():  # a concurrent process may have made it while this one waited
                _generate_into_place(root, cfg, chunk, progress)
    if not root.is_dir():
        raise ShardError(root, "exists and is not a folder")
    if read_manifest(root) is None:
        raise ShardError(
            root,
            f"exists and holds no {MANIFEST}: not a generated dataset, so nothing is generated "
            "into it (choose a folder that does not exist yet)",
        )
    return root


def _generate_into_place(root: Path, cfg: SynthConfig, chunk: int, progress: bool) -> None:
    partial = root.with_name(f".{root.name}.partial")
    request = partial / ".request.json"
    expected = manifest_of(cfg)
    if partial.is_dir():
        try:
            found = json.loads(request.read_text())
        except (OSError, ValueError):
            found = None
        if found == expected:
            log.info("resuming the interrupted generation in %s", partial)
        else:
            log.info("discarding %s: an interrupted generation with other settings (%s)", partial, found)
            shutil.rmtree(partial)
    if not partial.is_dir():
        ensure_space(root, dataset_bytes(cfg), "the synthetic dataset")
        try:
            partial.mkdir()
        except OSError as exc:
            raise WriteError(partial, f"cannot create the folder ({reason(exc)})") from exc
        write_text(request, json.dumps(expected), "the generation request")
    write_dataset(partial, cfg, chunk, progress)  # the manifest is written last
    request.unlink(missing_ok=True)
    try:
        os.rename(partial, root)
    except OSError as exc:
        raise WriteError(root, f"cannot move the generated dataset into place from {partial} ({reason(exc)})") from exc
    log.info("generated the synthetic dataset %s", root)


def main(argv: Sequence[str] | None = None) -> int:
    p = ToolParser(
        prog="moe data synth",
        description="Write a synthetic PFS MR dataset (pfsspec shards, train/val/test) into a new folder.",
    )
    d = SynthConfig()
    p.add_argument("--out", type=str, required=True, help="the dataset folder to create (must not exist yet)")
    p.add_argument("--train", type=PositiveInt, default=d.n_train, help="training spectra")
    p.add_argument("--val", type=PositiveInt, default=d.n_val, help="validation spectra")
    p.add_argument("--test", type=PositiveInt, default=d.n_test, help="test spectra")
    p.add_argument("--shard-size", type=PositiveInt, default=d.shard_size, help="spectra per shard file")
    p.add_argument("--pixels", type=PositiveInt, default=d.n_pixels, help="pixels over 7100-8850 A")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed of labels, spectra and errors")
    for flag, label in (("--teff", "T_eff"), ("--log-g", "log_g"), ("--m-h", "M_H")):
        lo, hi = LABEL_RANGES[label]
        p.add_argument(
            flag,
            type=float,
            nargs="+",
            default=None,
            help=f"LO HI: draw {label} uniformly in [LO, HI] instead of [{lo:g}, {hi:g}] (stars outside the "
            "training labels, for predict; such rows cannot train a model)",
        )
    a = p.parse_args(argv)
    for flag, pair in (("--teff", a.teff), ("--log-g", a.log_g), ("--m-h", a.m_h)):
        if pair is not None and (len(pair) != 2 or not pair[0] < pair[1]):
            raise ToolArgumentError(f"{flag}: give LO HI with LO below HI, got {' '.join(map(str, pair))}", p.prog)
    cfg = SynthConfig(
        a.train,
        a.val,
        a.test,
        a.shard_size,
        a.pixels,
        a.seed,
        tuple(a.teff) if a.teff else None,
        tuple(a.log_g) if a.log_g else None,
        tuple(a.m_h) if a.m_h else None,
    )
    existed = Path(a.out).exists()
    create_dataset(a.out, cfg)
    found = read_manifest(a.out)
    if found != manifest_of(cfg):
        raise ShardError(a.out, f"already holds a synthetic dataset generated with {found}; choose another --out")
    verb = "already holds" if existed else "wrote"
    print(f"{verb} {a.out} ({a.train} train / {a.val} val / {a.test} test, {a.pixels} px)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main, "moe data synth"))
