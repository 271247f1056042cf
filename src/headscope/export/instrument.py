"""``headscope export neuronpedia|hf``: results in other tools' layouts (files only, nothing uploaded)."""

from __future__ import annotations

from ..registry import Instrument
from ..runs import Command
from .options import HFOptions, NeuronpediaOptions

INSTRUMENT = Instrument(
    name="export",
    help="write results in other tools' layouts (files only, nothing is uploaded)",
    commands=(
        Command("export.neuronpedia", NeuronpediaOptions, "headscope.export.neuronpedia:cmd_export",
                doc="feature dashboards + explanations in Neuronpedia's import layout", needs_model=False),
        Command("export.hf", HFOptions, "headscope.export.hf:cmd_export",
                doc="an SAE folder ready to upload as a Hugging Face repo (SAELens format + README)",
                needs_model=False),
    ),
)
