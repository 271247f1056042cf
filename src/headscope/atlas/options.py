"""The atlas options (``headscope atlas build|serve`` flags, the study's ``[atlas]`` keys), declared once.
A leaf module: it imports nothing of headscope but :mod:`headscope.options`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..options import check


@dataclass(frozen=True)
class BuildOptions:
    """Writes RUN_DIR/atlas/ (open index.html from disk)."""

    example: list[str] = field(default_factory=list)
    """example prompts whose attention patterns every head page shows (default: three built-in ones)"""
    model: Optional[str] = None
    """the run's model (default: the one the run directory records)"""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """weights and activations dtype"""
    no_model: bool = False
    """do not load the model (no example attention patterns, no live prompts)"""


@dataclass(frozen=True)
class ServeOptions:
    """Serves RUN_DIR/atlas on 127.0.0.1 with the live prompt box."""

    host: str = "127.0.0.1"
    """address to bind"""
    port: int = 8765
    """port (0 picks a free one)"""
    allow_host: list[str] = field(default_factory=list)
    """also answer requests whose Host header is one of these names; by default only the bound address and
    localhost names are answered (DNS-rebinding protection)"""
    rebuild: bool = False
    """rebuild the atlas before serving"""
    verbose: bool = False
    """log every request"""
    model: Optional[str] = None
    """the run's model (default: the one the run directory records)"""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """weights and activations dtype"""
    no_model: bool = False
    """serve without a model (no live prompts)"""

    def __post_init__(self):
        check(0 <= self.port <= 65535, f"--port {self.port} is out of range: use 0..65535 (0 picks a free one)")
