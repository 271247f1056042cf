"""The typed result of the head-score stage (what ``run.heads.score()`` returns and the stage record keeps)."""

from __future__ import annotations

from dataclasses import dataclass

from ..results import Result


@dataclass(frozen=True)
class HeadScoresResult(Result):
    """``heads.score``: which layers were scored and the five highest heads of each score; the scores
    themselves are RUN/heads/scores.safetensors (``run.heads.load()``: [n_layers, n_heads] tensors)."""

    n_layers: int
    n_heads: int
    layers: list[int]
    """the layers scored (the others are NaN / None)"""
    top: dict[str, list[list]]
    """score name (induction, prev_token, duplicate_token) → [[layer, head, score], …], highest first"""
    prefix_lengths: list[int] | None = None
    """the prefix-induction lengths, when prefix induction was scored"""
