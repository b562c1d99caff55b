"""Fit-on-first-use of expert bundles: load the cached file of the data and fit settings, or fit it in a
child process (:mod:`moe.experts.isolated`) and save it there (:mod:`moe.experts.bundle` says where)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from moe.data import ranks
from moe.data.folder import SpectraFolder
from moe.data.labels import check_labels
from moe.experts.bundle import ExpertBundle, default_path, wide_alpha_table
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
    as a fresh fit would. Each stand-in is one INFO line. Collective over the ranks of a process group
    (:mod:`moe.data.ranks`): they fit together, each its share of the rows
    (:func:`moe.experts.isolated.fit_in_child`), and all load what rank 0 wrote.
    """
    target = Path(path) if path is not None else default_path(folder, cfg)
    rank = ranks.rank_world()[0]
    if ranks.broadcast(target.is_file() if rank == 0 else None):
        bundle = ExpertBundle.load(target, folder.fingerprint(), cfg)
        refuse_fallbacks(bundle.stand_ins(), cfg)
    else:
        check_labels(folder.train_set, folder.val_set, cfg.labels)  # a label mistake before the child starts
        if rank == 0:
            only = "".join(f"; {fam} for {', '.join(names)} only" for fam, names in cfg.family_labels)
            log.info(
                "fitting experts (%s; labels %s%s) -> %s", ", ".join(cfg.families), ", ".join(cfg.labels), only, target
            )
        folder.noisy_caches("val", shared=True)  # the alphas are chosen on it: its rows split over the ranks too
        fit_in_child(folder, cfg, target, progress)
        ranks.barrier()  # rank 0's child has written the bundle
        bundle = ExpertBundle.load(target, folder.fingerprint(), cfg)
        if rank == 0:
            log.info("experts saved to %s\n%s", target, wide_alpha_table(bundle.alpha_table()).to_string())
    for fam, name, n in bundle.stand_ins() if rank == 0 else ():
        log.info(
            "expert %s/%s has %d training rows, fewer than %d: the global expert stands in for it "
            "(fallback 'global' in the alpha table)",
            fam,
            name,
            n,
            cfg.min_samples,
        )
    return bundle
