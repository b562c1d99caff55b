"""Helpers two or more test modules share (pytest puts this folder on the path, as for reference_gate)."""

from __future__ import annotations

from pathlib import Path

import torch

from moe.cli import cli_main

DUAL_TOWER_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "dual_tower.yaml")


def predict_catalogue(ckpt: str | Path, args: list[str], predict_path: str, output: str | Path) -> None:
    """``moe predict`` of the dual-tower checkpoint ``ckpt`` on ``predict_path`` into the catalogue ``output``."""
    cli_main(
        [
            "predict",
            "--config",
            DUAL_TOWER_CONFIG,
            "--ckpt_path",
            str(ckpt),
            "--data.predict_path",
            predict_path,
            "--predict_writer.output",
            str(output),
            *args,
        ]
    )


def noisy_batch(dm, n: int, seed: int = 0) -> dict:
    """The first ``n`` training rows of ``dm`` with one fixed noise draw (``seed``) added to the flux."""
    b = next(iter(dm.stream("train", shuffle=False, batch_size=n)))
    g = torch.Generator().manual_seed(seed)
    b["flux"] = b["flux"] + b["error"] * torch.randn(b["flux"].shape, generator=g)
    return b


def fits_table(path):
    """A FITS catalogue as astropy reads it (NaN kept as NaN, not masked; 'dex' accepted quietly) and its table
    header's cards as (key, value, comment), DATE's value left out (the time of writing)."""
    import warnings

    from astropy.io import fits
    from astropy.table import Table

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy: 'dex' is no FITS-standard unit
        table = Table.read(path, mask_invalid=False)
    with fits.open(path) as hdus:
        cards = [(c.keyword, None if c.keyword == "DATE" else c.value, c.comment) for c in hdus[1].header.cards]
    return table, cards
