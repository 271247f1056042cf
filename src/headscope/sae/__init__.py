"""Sparse autoencoders on attention outputs (Kissane et al., arXiv 2406.17759).

Modules: :mod:`.model` (the SAE), :mod:`.io` (SAELens on-disk format), :mod:`.store` (activation
store and disk cache), :mod:`.train`, :mod:`.evaluate`, :mod:`.attribution` (weight attribution,
polysemanticity, DFA, recursive DFA), :mod:`.dashboards`, :mod:`.ioi`, :mod:`.sweep`,
:mod:`.atlas_data`, :mod:`.commands` (cache, sweep, dfa), :mod:`.options`.
"""

from .io import load_sae, save_sae
from .model import AttnSAE, SAEConfig

__all__ = ["AttnSAE", "SAEConfig", "load_sae", "save_sae"]
