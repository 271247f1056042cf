"""Tiny random models of every supported family, built from configs (no downloads).

Used by the test suite and the benchmarks; importable so other projects can test against them too.
"""

from .study import TINY_TABLES, tiny_study
from .tiny import FAMILIES, save_tiny_model, tiny_model, tiny_tokenizer

__all__ = ["FAMILIES", "TINY_TABLES", "save_tiny_model", "tiny_model", "tiny_study", "tiny_tokenizer"]
