"""SAE architectures, one module each, and their registry. Adding an architecture is one module (a subclass
of :class:`~.base.Architecture`) and one entry in :data:`REGISTRY` (plus its name in
``headscope.sae.options.TRAINABLE`` when headscope trains it: the CLI's choices are declared there)."""

from __future__ import annotations

from ...errors import HeadscopeError
from .base import Architecture
from .batchtopk import BatchTopK
from .gated import Gated
from .jumprelu import JumpReLU
from .matryoshka import MatryoshkaBatchTopK, default_matryoshka_widths
from .standard import Standard
from .topk import TopK

REGISTRY: dict[str, Architecture] = {a.name: a for a in (Standard(), TopK(), JumpReLU(), BatchTopK(),
                                                         MatryoshkaBatchTopK(), Gated())}
"""Architecture name → the architecture object."""


def get(name: str) -> Architecture:
    """The architecture called ``name``; a one-line error naming the known ones otherwise."""
    arch = REGISTRY.get(name)
    if arch is None:
        raise HeadscopeError(f"unknown SAE architecture '{name}' (choose from {', '.join(REGISTRY)})")
    return arch


__all__ = ["REGISTRY", "Architecture", "default_matryoshka_widths", "get"]
