"""The export options (``headscope export`` flags), declared once. A leaf module: it imports nothing of
headscope but :mod:`headscope.errors`."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import HeadscopeError


@dataclass(frozen=True)
class HFOptions:
    """Write an SAE as a Hugging Face model-repository folder in SAELens' layout (+ README model card)."""

    sae: str = ""
    """SAE name under RUN/sae/ (default: the only one)"""
    repo_id: str = "USER/REPO"
    """the repository id the card's loading example names"""
    license: str = "mit"
    """license in the card's front matter"""
    to: str = ""
    """the repository folder to create (required)"""

    def __post_init__(self):
        if not self.to:
            raise HeadscopeError("--to is required: the repository folder to create")


@dataclass(frozen=True)
class NeuronpediaOptions:
    """Write an SAE's feature dashboards and explanations in Neuronpedia's import layout."""

    sae: str = ""
    """SAE name under RUN/sae/ (default: the only one with dashboards)"""
    model_id: str = ""
    """Neuronpedia model id (default: the run's model name, lower-cased)"""
    source_set: str = "headscope-att"
    """source set name; the source id is '<layer>-<source set>'"""
    hf_repo_id: str = ""
    """Hugging Face repository holding the weights (from `headscope export hf`), if any"""
    creator_id: str = "headscope"
    """placeholder creator/author id (Neuronpedia sets the uploader's)"""
    batch_size: int = 512
    """features per batch file"""
    to: str = ""
    """folder to write <model_id>/<source_id>/ into (required)"""

    def __post_init__(self):
        if not self.to:
            raise HeadscopeError("--to is required: the folder to write the export into")
        if self.batch_size < 1:
            raise HeadscopeError("--batch-size must be at least 1")
