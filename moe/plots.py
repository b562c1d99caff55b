"""Every figure of the project: the gate module's TensorBoard panel and the experiment reports.

Each function takes arrays or DataFrames and returns a :class:`matplotlib.figure.Figure` built
without pyplot (no global state, no backend switch); :func:`save` writes one as PNG. Colours
come from :data:`PALETTE` (one colour per method, the same in every figure) and the role
colours below, all from Paul Tol's colour-blind-safe "muted" scheme and the Okabe-Ito set.
Every marker and line is named in a legend or an axis label.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps, patheffects
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap, to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from moe.data.bins import SNR_BIN_NAMES, SNR_BIN_RULE, SNR_EDGES, snr_bin, snr_slices
from moe.shared.atomic import AtomicFile

# Paul Tol "muted" and Okabe-Ito: distinguishable under the common colour-vision deficiencies.
INDIGO, CYAN, TEAL, GREEN, OLIVE = "#332288", "#88CCEE", "#44AA99", "#117733", "#999933"
SAND, ROSE, WINE, PURPLE = "#DDCC77", "#CC6677", "#882255", "#AA4499"
BLUE, ORANGE, VERMILLION = "#0072B2", "#E69F00", "#D55E00"
GREY, DARK_GREY, BLACK = "#999999", "#555555", "#000000"

PALETTE: dict[str, str] = {
    # baselines and oracle routing
    "Global Ridge": GREY,
    "Oracle (9 bins)": GREEN,
    "Ridge-Oracle (9 bins)": GREEN,
    "Oracle SNR-MoE (4 experts)": SAND,
    "Oracle-Hybrid": WINE,
    # learned gates over frozen Ridge experts
    "Phys-only gate": CYAN,
    "Quality-only gate": SAND,
    "Dual-tower concat": INDIGO,
    "Dual-tower logit-add": TEAL,
    "Dual-tower product": OLIVE,
    "Dual-tower temperature": ROSE,
    "36-expert gate": PURPLE,
    # expert types
    "OLS": DARK_GREY,
    "Ridge": BLUE,
    "LightGBM": ORANGE,
    "1D-CNN": VERMILLION,
}
"""Method label (as written in the reports) -> its colour in every figure."""

REFERENCE = BLACK  # decision thresholds and other reference lines
GAIN, LOSS = BLUE, VERMILLION  # signed differences (Delta R^2 bars)
SHADE = ORANGE  # highlighted groups (drawn translucent)
MARKER_EDGE = BLACK
_HALO = [patheffects.withStroke(linewidth=3, foreground="white")]  # keeps dark lines and text readable on any colour
DPI = 120


def method_colour(label: str) -> str:
    """The palette colour of a method label; a label without one is an error, so no figure invents a colour."""
    try:
        return PALETTE[label]
    except KeyError:
        raise KeyError(f"no palette colour for method {label!r}; add it to moe.plots.PALETTE") from None


def _figure(figsize=(6.4, 4.8)) -> Figure:
    return Figure(figsize=figsize, layout="constrained")


def _tick_labels(ax, x, labels: Sequence[str], fontsize: float = 8, wrap: int | None = None) -> None:
    """Tick labels: wrapped to ``wrap`` characters per line when given, else slanted when
    single-line labels are too long to sit side by side."""
    labels = [str(s) for s in labels]
    if wrap:
        labels = ["\n".join(textwrap.fill(part, wrap) for part in s.split("\n")) for s in labels]
    slanted = not wrap and any(len(s) > 6 and "\n" not in s for s in labels) and len(labels) > 3
    ax.set_xticks(
        x,
        labels,
        rotation=30 if slanted else 0,
        ha="right" if slanted else "center",
        rotation_mode="anchor",
        fontsize=fontsize,
    )


def entropy_vs_snr(
    snr: np.ndarray, entropy: np.ndarray, n_experts: int, title: str = "Gate entropy vs SNR", figsize=(6.4, 4.8)
) -> Figure:
    """Density of gate entropy [nats] against log10 SNR, with the median of each SNR bin (named
    X/L/M/H), the SNR-bin edges and the maximum entropy ln K of a gate over ``n_experts`` experts."""
    snr, entropy = np.asarray(snr, float), np.asarray(entropy, float)
    ok = np.isfinite(snr) & (snr > 0) & np.isfinite(entropy)
    log_snr, ent = np.log10(snr[ok]), entropy[ok]
    max_entropy = float(np.log(max(n_experts, 1)))
    fig = _figure(figsize)
    ax = fig.subplots()
    handles = []
    if ok.any():
        x_lo, x_hi = (
            min(log_snr.min(), np.log10(SNR_EDGES[0])) - 0.05,
            max(log_snr.max(), np.log10(SNR_EDGES[-1])) + 0.05,
        )
        y_hi = max(max_entropy, float(ent.max())) * 1.08 or 0.1
        *_, mesh = ax.hist2d(log_snr, ent, bins=(40, 30), range=((x_lo, x_hi), (0.0, y_hi)), cmap="viridis", cmin=1)
        fig.colorbar(mesh, ax=ax).set_label("spectra per cell")
        which = snr_bin(snr[ok])
        centres, medians = [], []
        for i, name in enumerate(SNR_BIN_NAMES):
            sel = which == i
            if sel.any():
                centres.append(float(np.median(log_snr[sel])))
                medians.append(float(np.median(ent[sel])))
                ax.annotate(
                    name,
                    (centres[-1], medians[-1]),
                    textcoords="offset points",
                    xytext=(0, 9),
                    ha="center",
                    fontsize=10,
                    fontweight="bold",
                    color=BLACK,
                    path_effects=_HALO,
                )
        ax.plot(centres, medians, "-", color=BLACK, lw=1.2, path_effects=_HALO, zorder=3)
        ax.plot(centres, medians, "o", color=ORANGE, mec=MARKER_EDGE, ms=7, zorder=4)
        handles.append(
            Line2D(
                [],
                [],
                color=BLACK,
                marker="o",
                mfc=ORANGE,
                mec=MARKER_EDGE,
                label=f"median per SNR bin ({SNR_BIN_RULE})",
            )
        )
        ax.set_xlim(x_lo, x_hi)
        ax.set_ylim(0.0, y_hi)
    else:
        ax.text(0.5, 0.5, "no spectra with a finite SNR", transform=ax.transAxes, ha="center", va="center")
    for edge in SNR_EDGES:
        ax.axvline(np.log10(edge), color=BLACK, lw=1.0, ls=":", path_effects=_HALO)
    ax.axhline(max_entropy, color=BLACK, lw=1.2, ls="--", path_effects=_HALO)
    handles += [
        Line2D([], [], color=BLACK, ls=":", label=f"SNR-bin edges ({', '.join(f'{e:g}' for e in SNR_EDGES)})"),
        Line2D([], [], color=BLACK, ls="--", label=f"maximum entropy ln {n_experts} = {max_entropy:.2f}"),
    ]
    ax.set_xlabel("log10 SNR   (SNR = ‖flux‖ / ‖noise_level · error‖)")
    ax.set_ylabel("gate entropy [nats]")
    ax.set_title(title)
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


SNR_BIN_COLOURS = {"X": VERMILLION, "L": ORANGE, "M": TEAL, "H": INDIGO}  # the four SNR bins, low to high


def calibration(z: np.ndarray, snr_bin_index: np.ndarray, title: str = "Calibration of the per-star sigma") -> Figure:
    """Observed coverage of the central interval +-q(p) sigma against its nominal probability p (a
    calibrated Gaussian sigma lies on the diagonal), overall and per SNR bin; z = (pred - true) / sigma."""
    from scipy.stats import norm

    z, which = np.asarray(z, float), np.asarray(snr_bin_index)
    ok = np.isfinite(z)
    nominal = np.linspace(0.02, 0.99, 50)
    half_width = norm.ppf(0.5 + nominal / 2)
    fig = _figure((5.6, 5.2))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color=REFERENCE, ls="--", lw=1, label="calibrated (diagonal)")
    for name, sel in snr_slices(which):
        sel = sel & ok
        overall = name == "all"
        if sel.sum() >= (1 if overall else 10):  # a bin's curve from 10 stars
            cover = (np.abs(z[sel])[:, None] <= half_width[None]).mean(0)
            ax.plot(
                nominal,
                cover,
                color=BLACK if overall else SNR_BIN_COLOURS[name],
                lw=2.2 if overall else 1.5,
                zorder=3 if overall else 2,  # the overall curve on top
                label=f"{name if overall else f'SNR {name}'} (n={int(sel.sum())}, z std {z[sel].std():.2f})",
            )
    for level in (0.683, 0.954):
        ax.axvline(level, color=GREY, lw=0.8, ls=":")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("nominal coverage p of |z| <= q(p)   (dotted: 1 sigma, 2 sigma)")
    ax.set_ylabel("observed coverage")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def bar(
    labels: Sequence[str],
    values: Sequence[float],
    ylabel: str,
    title: str,
    colors: Sequence[str] | str = GREY,
    hline: float | None = None,
    hline_label: str | None = None,
    annotate: Sequence[str] | None = None,
    legend: Mapping[str, str] | None = None,
    xlabel: str | None = None,
    wrap: int | None = None,
    figsize=(6.4, 4.8),
    errors: Sequence[float] | None = None,
    errors_label: str | None = None,
) -> Figure:
    """A bar per label with its value written above it (or ``annotate``), an optional reference line,
    and an optional legend ``{entry: colour}`` explaining the bar colours (entries whose colour no
    bar uses are left out). ``wrap``: tick labels wrapped at that many characters. ``errors``: a
    symmetric error bar per label (0 or NaN: none), named ``errors_label`` in the legend."""
    values = np.asarray(values, float)
    fig = _figure(figsize)
    ax = fig.subplots()
    x = np.arange(len(labels))
    bars = ax.bar(x, np.nan_to_num(values), color=colors, edgecolor=BLACK, linewidth=0.5)
    if errors is not None:
        ax.errorbar(
            x,
            np.nan_to_num(values),
            yerr=np.nan_to_num(np.asarray(errors, float)),
            fmt="none",
            ecolor=BLACK,
            elinewidth=1,
            capsize=3,
        )
    _tick_labels(ax, x, labels, wrap=wrap)
    texts = annotate if annotate is not None else ["–" if not np.isfinite(v) else f"{v:.3f}" for v in values]
    for b, t, v in zip(bars, texts, values):
        ax.annotate(
            t,
            (b.get_x() + b.get_width() / 2, np.nan_to_num(v)),
            textcoords="offset points",
            xytext=(0, 2 if v >= 0 or not np.isfinite(v) else -2),
            ha="center",
            va="bottom" if v >= 0 or not np.isfinite(v) else "top",
            fontsize=8,
            path_effects=_HALO,
        )
    ax.axhline(0.0, color=BLACK, lw=0.6)
    used = {to_rgb(c) for c in ([colors] if isinstance(colors, str) else colors)}
    handles = [
        Patch(facecolor=c, edgecolor=BLACK, linewidth=0.5, label=name)
        for name, c in (legend or {}).items()
        if to_rgb(c) in used
    ]
    if hline is not None:
        ax.axhline(hline, color=REFERENCE, ls="--", lw=1)
        if hline_label:
            handles.append(Line2D([], [], color=REFERENCE, ls="--", label=hline_label))
    if errors is not None and errors_label:
        handles.append(Line2D([], [], color=BLACK, marker="_", markersize=8, lw=1, label=errors_label))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3), fontsize=8, frameon=False)
    ax.margins(y=0.15)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_title(title)
    return fig


def grouped_bar(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    ylabel: str,
    title: str,
    hline: float | None = None,
    hline_label: str | None = None,
    counts: Sequence[int] | None = None,
    xlabel: str | None = None,
    star: Sequence[str | None] | None = None,
    star_label: str = "",
    shade: Sequence[int] = (),
    shade_label: str = "",
    figsize=(6.4, 4.8),
) -> Figure:
    """Bars of several methods (``series``: method label -> one value per group) side by side per group.

    NaN values draw no bar. ``star[g]`` names the method marked ★ in group ``g``; ``shade`` lists
    group indices drawn on a tinted background. Both are named in the legend.
    """
    fig = _figure(figsize)
    ax = fig.subplots()
    x = np.arange(len(groups))
    width = 0.8 / max(len(series), 1)
    offsets = {name: -0.4 + width * (i + 0.5) for i, name in enumerate(series)}
    for name, vals in series.items():
        ax.bar(
            x + offsets[name],
            np.nan_to_num(np.asarray(vals, float)),
            width,
            label=name,
            color=method_colour(name),
            edgecolor=BLACK,
            linewidth=0.5,
        )
    handles, _ = ax.get_legend_handles_labels()
    if star is not None:
        for g, name in enumerate(star):
            if name is not None:
                ax.annotate(
                    "★",
                    (g + offsets[name], np.nan_to_num(float(series[name][g]))),
                    textcoords="offset points",
                    xytext=(0, 1),
                    ha="center",
                    va="bottom",
                    fontsize=11,
                    color=BLACK,
                    path_effects=_HALO,
                )
        handles.append(Line2D([], [], ls="", marker="*", ms=10, color=BLACK, label=star_label or "marked"))
    for g in shade:
        ax.axvspan(g - 0.48, g + 0.48, color=SHADE, alpha=0.18, lw=0, zorder=0)
    if len(shade):
        handles.append(Patch(facecolor=SHADE, alpha=0.18, label=shade_label or "highlighted"))
    labels = list(groups) if counts is None else [f"{g}\n(n={c})" for g, c in zip(groups, counts)]
    _tick_labels(ax, x, labels)
    ax.axhline(0.0, color=BLACK, lw=0.6)
    if hline is not None:
        ax.axhline(hline, color=REFERENCE, ls="--", lw=1)
        handles.append(Line2D([], [], color=REFERENCE, ls="--", label=hline_label or f"{hline:g}"))
    ax.margins(y=0.12)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3), fontsize=8, frameon=False)
    return fig


def pred_vs_true(
    y: np.ndarray,
    pred: np.ndarray,
    r2: float,
    color: np.ndarray | None = None,
    color_label: str = "",
    title: str = "Predicted vs true log g",
    log_color: bool = False,
    categories: Sequence[str] | None = None,
    figsize=(6.4, 5.2),
) -> Figure:
    """Predictions against truth with the 1:1 line; ``r2`` (computed by the caller) and the count in
    the corner. ``color`` colours the points: continuous (log10 when ``log_color``) or, with
    ``categories``, integer codes 0..C-1 named on the colour bar."""
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    fig = _figure(figsize)
    ax = fig.subplots()
    kw: dict = {"color": BLUE}
    if color is not None:
        values = np.asarray(color, float)
        if categories is not None:
            cmap = ListedColormap(colormaps["viridis"](np.linspace(0.0, 1.0, len(categories))))
            kw = {
                "c": values,
                "cmap": cmap,
                "norm": BoundaryNorm(np.arange(len(categories) + 1) - 0.5, len(categories)),
            }
        else:
            kw = {"c": np.log10(np.clip(values, 1e-3, None)) if log_color else values, "cmap": "viridis"}
    points = ax.scatter(y, pred, s=4, alpha=0.6, rasterized=True, **kw)
    if color is not None:
        bar_ = fig.colorbar(ScalarMappable(points.norm, points.cmap), ax=ax)  # opaque, unlike the points
        bar_.set_label(("log10 " if log_color and categories is None else "") + color_label)
        if categories is not None:
            bar_.set_ticks(np.arange(len(categories)), labels=list(categories))
            bar_.ax.tick_params(labelsize=7)
    lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], ls="--", color=REFERENCE, lw=1, label="1:1")
    ax.text(
        0.04,
        0.96,
        f"R² = {r2:.4f}\nn = {y.size}",
        transform=ax.transAxes,
        va="top",
        fontsize=9,
        bbox={"facecolor": "white", "edgecolor": GREY, "alpha": 0.9},
    )
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("true log g [dex]")
    ax.set_ylabel("predicted log g [dex]")
    ax.set_title(title)
    return fig


def _luminance(rgb) -> float:
    """Relative luminance (WCAG) of an sRGB colour."""
    c = np.asarray(to_rgb(rgb))
    c = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(c @ [0.2126, 0.7152, 0.0722])


def heatmap(
    matrix: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    cbar_label: str,
    annotations: np.ndarray | None = None,
    cmap="viridis",
    center: float | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    figsize=(6.4, 4.8),
) -> Figure:
    """Annotated heatmap: each cell shows its value (or ``annotations[i, j]``) in black or white,
    whichever contrasts with the cell colour. ``center`` makes the colour scale symmetric about it."""
    m = np.asarray(matrix, float)
    fig = _figure(figsize)
    ax = fig.subplots()
    kw = {}
    if center is not None:
        span = float(np.nanmax(np.abs(m - center))) if np.isfinite(m).any() else 1.0
        span = span or 1.0
        kw = {"vmin": center - span, "vmax": center + span}
    image = ax.imshow(m, cmap=cmap, aspect="auto", **kw)
    ax.set_xticks(np.arange(len(col_labels)), col_labels, fontsize=8)
    ax.set_yticks(np.arange(len(row_labels)), row_labels, fontsize=8)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            text = annotations[i, j] if annotations is not None else (f"{m[i, j]:.3f}" if np.isfinite(m[i, j]) else "–")
            cell = image.cmap(image.norm(m[i, j]))[:3] if np.isfinite(m[i, j]) else (1.0, 1.0, 1.0)
            # 0.179: the luminance at which black and white text contrast equally with the cell
            ax.text(
                j,
                i,
                str(text),
                ha="center",
                va="center",
                fontsize=8,
                color=BLACK if _luminance(cell) > 0.179 else "white",
            )
    fig.colorbar(image, ax=ax).set_label(cbar_label)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig


def importance_spectrum(
    wave: np.ndarray,
    importance: Mapping[str, np.ndarray],
    measure: Mapping[str, str],
    line_centres: Sequence[float],
    bands: Sequence[tuple[float, float]],
    title: str,
    figsize=(9, 5.5),
) -> Figure:
    """One panel per model (``importance``: method label -> value per pixel; ``measure``: method
    label -> what the value is) against wavelength, with spectral lines (vertical lines) and
    bands (shaded) marked and named in the legend."""
    fig = _figure(figsize)
    axes = np.atleast_1d(fig.subplots(len(importance), 1, sharex=True))
    for ax, (name, values) in zip(axes, importance.items()):
        ax.plot(wave, values, lw=0.6, color=method_colour(name))
        ax.set_ylabel(f"{name}\n{measure[name]}", fontsize=9)
        for c in line_centres:
            ax.axvline(c, color=VERMILLION, lw=0.7, alpha=0.7, zorder=0)
        for lo, hi in bands:
            ax.axvspan(lo, hi, color=GREY, alpha=0.25, lw=0, zorder=0)
    axes[-1].set_xlabel("wavelength [Å]")
    axes[0].set_title(title)
    fig.legend(
        handles=[
            Line2D([], [], color=VERMILLION, lw=1, label="CaT / Na I line centres"),
            Patch(facecolor=GREY, alpha=0.25, label="telluric absorption bands"),
        ],
        loc="outside lower center",
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    return fig


def importance_hist(
    importance: Mapping[str, np.ndarray], top_share: Mapping[str, float], top_k: int, figsize=(9, 4)
) -> Figure:
    """Histogram of per-pixel importance (normalised to sum 1, log10) per model, titled with the
    share held by the ``top_k`` most important pixels against a uniform spread."""
    fig = _figure(figsize)
    axes = np.atleast_1d(fig.subplots(1, len(importance)))
    for ax, (name, values) in zip(axes, importance.items()):
        values = np.asarray(values, float)
        total = values.sum()
        normalised = values / total if total > 0 else values
        positive = normalised[normalised > 0]
        ax.hist(np.log10(positive) if positive.size else [], bins=60, color=method_colour(name))
        ax.set_xlabel(f"log10 normalised importance ({name})")
        ax.set_ylabel("pixels")
        ax.set_title(
            f"top-{top_k} pixels hold {top_share[name] * 100:.1f}% (uniform: {top_k / values.size * 100:.1f}%)",
            fontsize=9,
        )
    return fig


def spectra_regions(
    wave: np.ndarray,
    flux: np.ndarray,
    labels: Sequence[str],
    regions: Sequence[tuple[float, float, str]],
    figsize=(11, 4.6),
) -> Figure:
    """Spectra ``flux`` [S, D] (one legend label each) in the wavelength ``regions`` ``(lo, hi, title)``, one panel each."""
    colours = (VERMILLION, BLUE, GREEN, ORANGE, PURPLE)
    widths = [np.sqrt(hi - lo) for lo, hi, _ in regions]  # wide regions get more room, not proportionally more
    fig = _figure(figsize)
    axes = np.atleast_1d(fig.subplots(1, len(regions), gridspec_kw={"width_ratios": widths}))
    for ax, (lo, hi, name) in zip(axes, regions):
        m = (wave >= lo) & (wave <= hi)
        for row, label, colour in zip(flux, labels, colours):
            ax.plot(wave[m], row[m], color=colour, lw=1.1, label=label)
        ax.set_title(name)
        ax.set_xlabel("wavelength [Å]")
        ax.set_ylabel("normalised flux")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=len(labels), fontsize=8, frameon=False)
    return fig


def leakage_checks(
    best_r2: float,
    best_model: str,
    checks: Sequence[str],
    targets: Sequence[str],
    r2: Sequence[float],
    threshold: float,
) -> Figure:
    """Test R^2 of the best error-only model (``best_model``'s colour) next to each sanity check
    (coloured by its target, ``log g`` or ``log10 SNR``), with the leakage line at ``threshold``."""
    target_colour = {"log g": PALETTE["Ridge"], "log10 SNR": SAND}
    return bar(
        ["error vector (best model)", *checks],
        [best_r2, *r2],
        "test R²",
        "Leakage sanity checks",
        colors=[method_colour(best_model)] + [target_colour[t] for t in targets],
        hline=threshold,
        hline_label=f"leakage line R² = {threshold}",
        legend={
            f"best error-only model ({best_model}; R² floored at 0)": method_colour(best_model),
            "Ridge -> log g": target_colour["log g"],
            "Ridge -> log10 SNR": target_colour["log10 SNR"],
        },
        wrap=14,
        figsize=(10, 5.2),
    )


def delta_r2_column(
    rows: Sequence[str],
    delta: Sequence[float],
    r2_base: Sequence[float],
    r2_new: Sequence[float],
    counts: Sequence[int],
    column: str,
    title: str,
) -> Figure:
    """One-column heatmap of Delta R^2 (``column``: new − base) per row, on a scale centred at 0; each cell
    names its Delta R^2, the R^2 base → new and its count."""
    cell_text = np.array(
        [[f"ΔR² {d:+.3f}\n{b:.3f} → {a:.3f}\nn = {n}"] for d, b, a, n in zip(delta, r2_base, r2_new, counts)],
        dtype=object,
    )
    return heatmap(
        np.asarray(delta, float)[:, None],
        list(rows),
        [column],
        title,
        f"ΔR² ({column})",
        annotations=cell_text,
        cmap="RdBu",
        center=0.0,
    )


def expert_selection(r2: np.ndarray, bins: Sequence[str], types: Sequence[str], chosen: Sequence[str]) -> Figure:
    """Heatmap of test R^2 per bin (rows) and expert type (columns); ★ marks each bin's ``chosen`` type,
    – a type not trained there (NaN)."""
    cell_text = np.array(
        [
            [
                ("–" if not np.isfinite(v) else f"{v:.3f}") + (" ★" if types[j] == chosen[i] else "")
                for j, v in enumerate(row)
            ]
            for i, row in enumerate(np.asarray(r2, float))
        ]
    )
    return heatmap(
        r2,
        list(bins),
        list(types),
        "Expert selection per bin",
        "test R²",
        annotations=cell_text,
        xlabel="expert type (★ chosen on validation; – not trained)",
        ylabel="physical bin",
    )


def gain_per_bin(
    bins: Sequence[str], gains: Sequence[float], chosen: Sequence[str], target: float, xlabel: str
) -> Figure:
    """Delta R^2 of each bin's chosen expert over its Ridge expert, coloured by sign and annotated with
    the chosen type, with the verdict line at ``target``."""
    gains = np.asarray(gains, float)
    return bar(
        list(bins),
        gains,
        "ΔR² best expert vs Ridge",
        "Per-bin gain over Ridge",
        colors=[GAIN if v > 0 else LOSS if v < 0 else GREY for v in gains],
        hline=target,
        hline_label=f"+{target} (verdict line)",
        annotate=[f"{v:+.3f}\n{t}" for v, t in zip(gains, chosen)],
        legend={"gain": GAIN, "loss": LOSS, "no change (Ridge chosen)": GREY},
        xlabel=xlabel,
        figsize=(7.5, 5.2),
    )


def differences(
    labels: Sequence[str],
    seed_values: Sequence[Sequence[float]],
    ci: Sequence[tuple[float, float]],
    seed_ci: Sequence[tuple[float, float] | None],
    thresholds: Sequence[float],
    xlabel: str,
    title: str,
    notes: Sequence[str] | None = None,
) -> Figure:
    """One row per compared pair: each training seed's difference (dots), the paired bootstrap 95% CI over
    test stars (thick bar), the 95% interval of the mean over seeds (thin bar, when there are two or more)
    and the row's decision threshold (a vertical tick); a verdict decides only when both bars clear it.
    ``notes``: a word per row written right of the plot (the verdict)."""
    n = len(labels)
    fig = _figure((7.5, 1.0 + 0.55 * n))
    ax = fig.subplots()
    y = np.arange(n)[::-1]
    for yi, values, (lo, hi), s_ci, thr in zip(y, seed_values, ci, seed_ci, thresholds):
        ax.plot([lo, hi], [yi + 0.12] * 2, color=BLUE, lw=5, solid_capstyle="butt", alpha=0.8)
        if s_ci is not None:
            ax.plot(list(s_ci), [yi - 0.12] * 2, color=ORANGE, lw=2)
        ax.plot(values, [yi - 0.12] * len(values), "o", color=ORANGE, mec=MARKER_EDGE, mew=0.5, ms=5)
        ax.plot([thr, thr], [yi - 0.35, yi + 0.35], color=REFERENCE, ls="--", lw=1.2)
    for yi, note in zip(y, notes or ()):
        ax.annotate(note, (1.01, yi), xycoords=("axes fraction", "data"), va="center", fontsize=8)
    ax.axvline(0.0, color=GREY, lw=0.6)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    handles = [
        Line2D([], [], color=BLUE, lw=5, alpha=0.8, label="bootstrap 95% CI (test stars)"),
        Line2D([], [], color=ORANGE, lw=2, marker="o", mec=MARKER_EDGE, label="seeds and their 95% interval"),
        Line2D([], [], color=REFERENCE, ls="--", lw=1.2, label="decision threshold"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    return fig


def save(fig: Figure, path) -> Path:
    """Write ``fig`` as PNG atomically (:class:`moe.shared.atomic.AtomicFile`: a failed write is one
    :class:`~moe.shared.errors.WriteError` naming ``path``, and no temporary file is left)."""
    path = Path(path)
    with AtomicFile(path, "the figure", body_failures=(OSError,)) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    return path
