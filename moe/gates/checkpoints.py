"""Reading checkpoint files safely: tensors, plain types and the project's settings, nothing else."""

from __future__ import annotations

import os

import torch

from moe.data.synth import SynthConfig
from moe.experts.bundle import ExpertsMismatchError


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint's contents, loaded with ``weights_only=True`` (a file that needs more is rejected, named)."""
    try:
        with torch.serialization.safe_globals([SynthConfig]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExpertsMismatchError(f"{path}: not a loadable moe checkpoint ({exc})") from exc
