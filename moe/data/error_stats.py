"""The 10 aggregate statistics of the error vector, numpy/scipy reference.

The reference definitions of the quality features: population skew and excess kurtosis
(scipy's defaults), numpy's linear-interpolation percentiles. ``moe.features`` holds the
torch twin that runs on the batch's device and is tested against this one.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

QUALITY_NAMES = ("mean", "std", "min", "max", "median", "sum", "q25", "q75", "skew", "kurtosis")
QUALITY_SUBSET5 = ("mean", "std", "median", "q25", "q75")


def quality_stats(error: np.ndarray) -> np.ndarray:
    """[N, D] error vectors -> [N, 10] statistics in the order of ``QUALITY_NAMES`` (float64)."""
    e = np.asarray(error, dtype=np.float64)
    return np.column_stack(
        [
            e.mean(-1),
            e.std(-1),
            e.min(-1),
            e.max(-1),
            np.median(e, -1),
            e.sum(-1),
            np.percentile(e, 25, -1),
            np.percentile(e, 75, -1),
            stats.skew(e, axis=-1),
            stats.kurtosis(e, axis=-1),
        ]
    )
