"""The catalogue's flag word: one ``enum.IntFlag``, a bit per doubt, fixed values.

A bit's meaning never changes once released; later bits may follow (as the PFS GA template fit's
``TempFitFlag`` and the SDSS bitmasks do). ``flags == 0``: nothing to warn about.

| bit | value | name          | set when |
|-----|-------|---------------|----------|
| 0   | 1     | LOW_SNR       | the star's SNR (on its usable pixels) is <= 2 (SNR bin X) |
| 1   | 2     | MASKED        | more than 10 % of the pixels are masked, or more than half of a physics window's |
| 2   | 4     | LABEL_EDGE    | a predicted label lies outside the training range, or within its sigma of an edge (which: ``<label>_edge``) |
| 3   | 8     | OOD           | ``ood_score`` > 1: above the training set's threshold (0.5 % of training-like stars are) |
| 4   | 16    | NO_PREDICTION | fewer than half of the pixels are usable: the labels and sigma are NaN |
"""

from __future__ import annotations

import enum

LOW_SNR_MAX = 2.0  # SNR at or below which LOW_SNR is set (the upper edge of SNR bin X)
MASKED_FRACTION = 0.10  # share of masked pixels above which MASKED is set
WINDOW_MASKED_FRACTION = 0.5  # share of one physics window's pixels above which MASKED is set
MIN_USABLE_FRACTION = 0.5  # share of usable pixels below which a star gets no prediction


class CatalogueFlag(enum.IntFlag):
    """Bits of the catalogue's ``flags`` column (module docstring)."""

    LOW_SNR = 1
    """SNR <= 2 on the usable pixels (SNR bin X): the labels are barely constrained by the spectrum."""
    MASKED = 2
    """More than 10 % of the pixels masked, or more than half of a physics window (a CaT / Na I line or
    its continuum side-bands): the prediction leans on imputed flux (its sigma includes that)."""
    LABEL_EDGE = 4
    """A predicted label outside the training labels' range, or within its sigma of an edge: the experts
    extrapolate there, and the truth may lie beyond the range. Set by any label; the catalogue's bool column
    ``<label>_edge`` says which."""
    OOD = 8
    """``ood_score`` > 1, i.e. above the thresholds set on training-like stars (0.5 % of them exceed it): the
    spectrum is unlike the training spectra (another kind of star, a wrong grid, no star at all)."""
    NO_PREDICTION = 16
    """Fewer than half of the pixels usable: the labels and sigma are NaN."""


MEANINGS = {
    CatalogueFlag.LOW_SNR: f"SNR <= {LOW_SNR_MAX:g} on the usable pixels (SNR bin X)",
    CatalogueFlag.MASKED: f"more than {MASKED_FRACTION:.0%} of the pixels masked, or more than "
    f"{WINDOW_MASKED_FRACTION:.0%} of a physics window (CaT / Na I line or side-band); sigma includes the imputation",
    CatalogueFlag.LABEL_EDGE: "a predicted label outside the training range, or within its sigma of an edge "
    "(which: the <label>_edge columns)",
    CatalogueFlag.OOD: "ood_score > 1: above the training thresholds (0.5% of training-like stars are)",
    CatalogueFlag.NO_PREDICTION: f"fewer than {MIN_USABLE_FRACTION:.0%} of the pixels usable: labels and sigma NaN",
}


def describe() -> dict[str, str]:
    """``{"<value> NAME": meaning}`` of every bit, for catalogue headers and sidecar files."""
    return {f"{f.value} {f.name}": MEANINGS[f] for f in CatalogueFlag}
