"""Tina on Ray: text-to-model generation of personalized classifiers (arXiv 2405.14132)."""

__version__ = "0.1.0"
