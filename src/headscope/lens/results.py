"""The typed results of the lens stages (what ``run.lens.train()`` / ``run.lens.eval()`` return and the
stage records keep)."""

from __future__ import annotations

from dataclasses import dataclass

from ..results import Result


@dataclass(frozen=True)
class LensTrainResult(Result):
    """``lens.train``: how many heads got a lens and the refinement's length (RUN/lens/train.json has the rest)."""

    sites: int
    steps: int | None = None
    tokens_seen: int | None = None


@dataclass(frozen=True)
class LensEvalResult(Result):
    """``lens.eval``: the headline readings of RUN/lens/eval.json (information gain in bits/token over the
    null lens; informative = one-sided test, Benjamini–Hochberg q = 0.05)."""

    tokens: int
    documents: int
    n_heads: int
    n_positive_gain: int
    n_informative: int
    n_informative_2se: int
    median_gain: float
    median_gain_se: float | None
    control_gain: list[float]
    """the gain of each control lens (a lens of a scrambled head output: what 'no information' reads)"""
