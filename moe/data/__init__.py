"""Data layer: shard format, synthetic generator, noise/SNR/bins, streaming DataModule.

Knows nothing of experts, features or gates.
"""
