"""The labels a fit asks for, checked against the shards before any pass over the spectra.

A label is any numeric column of the shards' parameter table (``log_g``, ``T_eff``, ``M_H``, ``a_M``,
...). :func:`check_labels` reads the (small) parameter tables of the train and val splits and stops
with one :class:`LabelError` line naming the flag and the file when a label

- is missing from a shard's table,
- is not numeric there (text, booleans),
- is NaN or infinite on a row the fit would use (strict, as for log g: ``bad_rows="drop"`` leaves out
  only the rows :mod:`moe.data.row_check` screens, i.e. bad ``log_g``/``T_eff``/``M_H``),
- is constant over the training split's rows (nothing to regress on),
- or shares its name with a field every batch carries already (``flux``, ``snr``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from moe.data.shards import read_params
from moe.data.stream import ShardSet
from moe.shared.errors import ShardError

# what ``moe experts`` and ``moe fit`` call the setting; the message names both
FLAG = "--labels (moe experts) / --model.labels (moe fit)"
# fields a batch carries besides the labels (moe.data.stream): a label may not take one of these names
BATCH_FIELDS = ("flux", "error", "usable", "snr", "phys_bin", "snr_bin", "row")


class LabelError(ShardError):
    """A requested label that the shards cannot supply; the message names the flag and the file."""


def check_labels(train: ShardSet, val: ShardSet, labels: Sequence[str], flag: str = FLAG) -> None:
    """Every label of ``labels`` is a numeric, finite column of every train and val shard (on the rows the
    split keeps) and not constant over the training split; else one :class:`LabelError`."""
    if not labels:
        raise LabelError(train.paths[0].parent.parent, f"{flag}: no label asked for")
    for label in labels:
        if label in BATCH_FIELDS or label.startswith("id_"):
            raise LabelError(
                train.paths[0], f"{flag} {label}: that name is a batch field ({', '.join(BATCH_FIELDS)}, id_*)"
            )
    lo = dict.fromkeys(labels, np.inf)
    hi = dict.fromkeys(labels, -np.inf)
    for split, shards in (("train", train), ("val", val)):
        for k, info in enumerate(shards.infos):
            n = int(shards.counts[k])
            table = read_params(info.path, info.params_key, labelled=False).iloc[:n]
            keep = shards.keep_mask(int(shards.offsets[k]), int(shards.offsets[k + 1]))
            for label in labels:
                if label not in table.columns:
                    raise LabelError(
                        info.path,
                        f"{flag} {label}: the parameter table has no column {label!r} "
                        f"(it has {', '.join(map(str, table.columns))})",
                    )
                col = table[label]
                if not pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype):
                    raise LabelError(
                        info.path, f"{flag} {label}: column {label!r} has dtype {col.dtype}, a label must be numeric"
                    )
                v, rows = col.to_numpy(np.float64, na_value=np.nan), np.arange(n)
                if keep is not None:
                    v, rows = v[keep], rows[keep]
                bad = np.flatnonzero(~np.isfinite(v))
                if bad.size:
                    raise LabelError(
                        info.path,
                        f"{flag} {label}: {bad.size} {split} row(s) have NaN or Inf in column {label!r} "
                        f"(first: row {rows[bad[0]]}); every row a fit uses needs every label",
                    )
                if split == "train" and v.size:
                    lo[label], hi[label] = min(lo[label], v.min()), max(hi[label], v.max())
    for label in labels:
        if lo[label] == hi[label]:
            where = train.paths[0] if len(train.paths) == 1 else train.paths[0].parent.parent
            raise LabelError(
                where,
                f"{flag} {label}: column {label!r} is constant ({lo[label]:g}) over the {train.n_kept} training rows "
                f"of {len(train.paths)} shard(s); there is nothing to learn",
            )
