"""Expert families and how their groups are made of *cells*.

Every training sample falls in exactly one cell of a partition; the statistics are
accumulated per cell once and every group is a sum of cells. The partition is the
coarsest one that serves all requested families:

=========  ======  ==========================================
family     groups  members
=========  ======  ==========================================
global     1       everything
phys       9       T_eff x M_H bin (``moe.data.bins.phys_bin``)
snr        4       SNR bin X / L / M / H
cells      36      (phys bin, SNR bin), shrunk toward the phys expert
=========  ======  ==========================================
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from moe.data import bins

Family = Literal["global", "phys", "snr", "cells"]
FAMILIES: tuple[str, ...] = get_args(Family)
FAMILY_SIZES = {"global": 1, "phys": bins.N_PHYS_BINS, "snr": bins.N_SNR_BINS, "cells": bins.N_CELLS}


def check_families(families) -> tuple[str, ...]:
    """Validated, canonically ordered family names (``cells`` implies ``phys``)."""
    fams = set(families)
    unknown = fams - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown expert families {sorted(unknown)}; choose from {FAMILIES}")
    if "cells" in fams:
        fams.add("phys")
    fams.add("global")
    return tuple(f for f in FAMILIES if f in fams)


def relies_on(family: str) -> tuple[str, ...]:
    """The families whose groups a gate over ``family`` is made of: the family itself and the global expert;
    the 36 ``cells`` also their physical and SNR groups (the cells refine both, their shrinkage alpha is
    pooled per SNR bin). A gate mixing a stand-in for one of these groups has to be asked for."""
    return check_families((family, "snr") if family == "cells" else (family,))


def partition_for(families) -> str:
    """Coarsest partition ('joint', 'phys', 'snr' or 'none') that serves ``families``."""
    fams = set(check_families(families))
    if "cells" in fams or {"phys", "snr"} <= fams:
        return "joint"
    if "phys" in fams:
        return "phys"
    if "snr" in fams:
        return "snr"
    return "none"


def n_cells(partition: str) -> int:
    return {"joint": bins.N_CELLS, "phys": bins.N_PHYS_BINS, "snr": bins.N_SNR_BINS, "none": 1}[partition]


def cell_index(partition: str, phys_bin: np.ndarray, snr_bin: np.ndarray) -> np.ndarray:
    """Cell of each sample under ``partition``."""
    if partition == "joint":
        return bins.cell(phys_bin, snr_bin)
    if partition == "phys":
        return np.asarray(phys_bin, dtype=np.int64)
    if partition == "snr":
        return np.asarray(snr_bin, dtype=np.int64)
    return np.zeros(np.shape(phys_bin), dtype=np.int64)


def members(family: str, partition: str) -> list[np.ndarray]:
    """For each group of ``family``, the cells (under ``partition``) it sums."""
    c = n_cells(partition)
    if family == "global":
        return [np.arange(c)]
    if family == "phys":
        if partition == "phys":
            return [np.array([k]) for k in range(bins.N_PHYS_BINS)]
        return [np.arange(bins.N_SNR_BINS) + bins.N_SNR_BINS * k for k in range(bins.N_PHYS_BINS)]
    if family == "snr":
        if partition == "snr":
            return [np.array([s]) for s in range(bins.N_SNR_BINS)]
        return [np.arange(bins.N_PHYS_BINS) * bins.N_SNR_BINS + s for s in range(bins.N_SNR_BINS)]
    if family == "cells":
        return [np.array([k]) for k in range(bins.N_CELLS)]
    raise ValueError(f"unknown family {family!r}")


def group_names(family: str) -> list[str]:
    if family == "global":
        return ["global"]
    if family == "phys":
        return list(bins.PHYS_BIN_NAMES)
    if family == "snr":
        return [f"SNR-{n}" for n in bins.SNR_BIN_NAMES]
    return [f"{p}/SNR-{s}" for p in bins.PHYS_BIN_NAMES for s in bins.SNR_BIN_NAMES]


def group_of(family: str, phys_bin, snr_bin):
    """The group of ``family`` each sample belongs to (oracle routing).

    Plain integer arithmetic, so it serves numpy arrays and torch tensors (on any device) alike.
    """
    if family == "global":
        return phys_bin * 0
    if family == "phys":
        return phys_bin
    if family == "snr":
        return snr_bin
    if family == "cells":
        return bins.N_SNR_BINS * phys_bin + snr_bin
    raise ValueError(f"unknown family {family!r}")
