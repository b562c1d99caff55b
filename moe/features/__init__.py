"""Gate inputs computed in torch on the batch's device.

- :mod:`moe.features.quality`: 10 aggregate statistics of the error vector;
- :mod:`moe.features.physics`: CaT / Na I depths and equivalent widths, PCA1-4 of the flux;
- :mod:`moe.features.scaler`: standardisation with training statistics.
"""

from moe.features.physics import PHYSICS_NAMES, PhysicsFeatures
from moe.features.quality import QUALITY_NAMES, quality_features
from moe.features.scaler import Standardizer

__all__ = ["PHYSICS_NAMES", "QUALITY_NAMES", "PhysicsFeatures", "Standardizer", "quality_features"]
