"""The head-scores instrument: ``headscope heads score`` and the study's ``[heads.score]`` table."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..options import check
from ..registry import Instrument
from ..runs import Stage


@dataclass(frozen=True)
class ScoreOptions:
    """Scores every head on repeated random tokens and on the prefix-induction task of arXiv 2406.17759;
    writes RUN/heads/scores.json, scores.safetensors and PNG heatmaps."""

    layers: str = "all"
    """layers to score: all, 3, 1,4, 10-13, -4"""
    n_seqs: int = 32
    """repeated-token sequences"""
    half_len: int = 50
    """length of each random half"""
    prefix_examples: int = 100
    """examples per prefix length; 0 skips prefix induction (paper: 400)"""
    prefix_lengths: list[int] = field(default_factory=lambda: list(range(1, 10)))
    """prefix lengths of the prefix-induction task"""
    batch_size: int = 8
    """sequences per forward pass"""
    seed: int = 0
    """seed of the random sequences"""

    def __post_init__(self):
        check(len(self.prefix_lengths) >= 1 and min(self.prefix_lengths) >= 1, "--prefix-lengths must be >= 1")
        for name in ("n_seqs", "half_len", "batch_size"):
            check(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
        check(self.prefix_examples >= 0, "--prefix-examples must be 0 or more")


def report(summary: dict, opts: ScoreOptions, run) -> None:
    """Print the top heads of each score (read from RUN/heads/scores.json)."""
    from ..runs import read_json
    from .scores import SCORES, top_heads
    doc = read_json(run / "heads" / "scores.json")
    print(f"head scores ({doc['n_layers']} layers × {doc['n_heads']} heads) in {run / 'heads'}")
    for name in SCORES:
        tops = ", ".join(f"{l}.{h}={v:.2f}" for l, h, v in top_heads(doc["scores"][name]))
        print(f"  top {name.replace('_', '-')} heads: {tops}")
    if doc.get("prefix_induction"):
        longest = doc["prefix_induction"]["scores"][-1]
        tops = ", ".join(f"{l}.{h}={v:.2f}" for l, h, v in top_heads(longest))
        print(f"  top prefix-induction heads (prefix {doc['prefix_induction']['prefix_lengths'][-1]}): {tops}")


def load(model, run) -> dict:
    """The head scores as tensors: ``induction``, ``prev_token``, ``duplicate_token`` ``[n_layers, n_heads]``
    (NaN for layers not scored) and, when computed, ``prefix_induction`` ``[n_prefix_lengths, n_layers,
    n_heads]`` (prefix lengths in RUN/heads/scores.json)."""
    from ..errors import HeadscopeError
    from ..runs import read_tensors
    path = run / "heads" / "scores.safetensors"
    if not path.is_file():
        raise HeadscopeError(f"no head scores in {run.path}: run `run.heads.score()` first")
    return read_tensors(path)


INSTRUMENT = Instrument(
    name="heads",
    help="head scores on synthetic sequences",
    stages=(
        Stage("heads.score", ScoreOptions, "headscope.heads.scores:run_head_scores",
              writes=lambda o: ["heads/scores.json", "heads/scores.safetensors"],
              doc="induction, previous-token, duplicate-token and prefix-induction scores of every head",
              report="headscope.heads.instrument:report"),
    ),
    atlas_data="headscope.heads.atlas_data:atlas_data",
    loaders=(("load", "headscope.heads.instrument:load"),),
)
