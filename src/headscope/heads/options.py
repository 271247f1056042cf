"""The head-score options (``headscope heads score`` flags, the study's ``[heads.score]`` keys), declared
once. A leaf module: it imports nothing of headscope but :mod:`headscope.options`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..options import check


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
