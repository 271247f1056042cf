"""The typed result of the ``heads.roles`` stage (a light module: the registry imports it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..results import Result


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
