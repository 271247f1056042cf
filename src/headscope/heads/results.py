"""The typed results of the heads instrument's stages (what ``run.heads.score()`` / ``run.heads.roles()`` return and
the stage record keeps)."""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class RolesResult(Result):
    """What ``heads.roles`` found: per role, how many heads it shows and confirms, and how many heads pass
    the role's threshold on its control (what "no role" gives); the screen's agreement with real ablations."""

    census: dict = field(default_factory=dict)
    """role → {"shown", "confirmed", "ablated", "control_over_threshold", "control_name"}"""
    n_heads: int = 0
    heads_with_confirmed_role: int = 0
    agreement: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    path: str = ""
