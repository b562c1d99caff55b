"""Fit-on-first-use of expert bundles: load the cached file of the data and fit settings, or fit it in a
child process (:mod:`moe.experts.isolated`) and save it there (:mod:`moe.experts.bundle` says where)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from moe.data.folder import SpectraFolder
from moe.experts.bundle import ExpertBundle, default_path
from moe.experts.fit import FitConfig, refuse_fallbacks
from moe.experts.isolated import fit_in_child

log = logging.getLogger(__name__)


def load_or_fit(
    folder: SpectraFolder, cfg: FitConfig = FitConfig(), path: str | os.PathLike | None = None, progress: bool = True
) -> ExpertBundle:
    """The experts for ``folder`` and ``cfg``: loaded from ``path`` (default: the cache) or fitted and saved there.

    An existing file that does not match the data or config raises
    :class:`~moe.experts.bundle.ExpertsMismatchError`; one that stands the global expert in for a short
    group ``cfg`` relies on (fitted for a run that did not) raises :class:`~moe.experts.fit.GroupTooSmallError`,
    as a fresh fit would. Each stand-in is one INFO line.
    """
    target = Path(path) if path is not None else default_path(folder, cfg)
    if target.is_file():
        bundle = ExpertBundle.load(target, folder.fingerprint(), cfg)
        refuse_fallbacks(bundle.stand_ins(), cfg)
    else:
        log.info("fitting experts (%s) -> %s", ", ".join(cfg.families), target)
        fit_in_child(folder, cfg, target, progress)
        bundle = ExpertBundle.load(target, folder.fingerprint(), cfg)
        log.info("experts saved to %s\n%s", target, bundle.alpha_table().to_string(index=False))
    for fam, name, n in bundle.stand_ins():
        log.info(
            "expert %s/%s has %d training rows, fewer than %d: the global expert stands in for it "
            "(fallback 'global' in the alpha table)",
            fam,
            name,
            n,
            cfg.min_samples,
        )
    return bundle
