"""Model loading and architecture adapters."""

from .arch import ARCHS, ArchSpec, arch_for
from .load import Model, load_model

__all__ = ["ARCHS", "ArchSpec", "Model", "arch_for", "load_model"]
