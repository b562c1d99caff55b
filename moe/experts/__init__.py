"""Frozen Ridge experts: streamed sufficient statistics, exact solver, torch buffers.

Knows nothing of Lightning or gates.
"""

from moe.experts.module import RidgeExperts

__all__ = ["RidgeExperts"]
