"""Frozen Ridge experts: streamed sufficient statistics, exact solver, torch buffers.

Knows nothing of Lightning or gates.
"""

from moe.experts.ridge_experts import RidgeExperts

__all__ = ["RidgeExperts"]
