"""The one preparation step (Lightning-free): experts, feature windows and PCA, feature scalers and
the per-row gate-input caches of a dataset folder, built once and handed to the gate."""

from moe.prepare.inputs import attach_inputs, ensure_inputs, map_key
from moe.prepare.step import PrepareConfig, Prepared, experts_file, fit_scalers, prepare, stream_labels

__all__ = [
    "PrepareConfig",
    "Prepared",
    "attach_inputs",
    "ensure_inputs",
    "experts_file",
    "fit_scalers",
    "map_key",
    "prepare",
    "stream_labels",
]
