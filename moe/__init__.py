"""moe: mixture of frozen Ridge experts with learned gates for stellar log g from PFS MR spectra."""

__version__ = "0.1.0"
