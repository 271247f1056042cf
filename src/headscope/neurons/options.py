"""The head → neuron look-up options (``headscope neurons`` flags, the study's ``[neurons.*]`` keys),
declared once. A leaf module: it imports nothing of headscope but :mod:`headscope.options`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from simple_parsing import field
from simple_parsing.helpers import flag

from ..options import check


Which = Literal["top", "random"]


@dataclass(frozen=True)
class FindOptions:
    """Ranks MLP neurons by the congruence of their output weight with the unembedding (dot, cosine, kurtosis,
    skew); writes RUN/neurons/find.json."""

    which: Which = field(default="top", alias=["--set"])
    """neuron set: congruent neurons (top) or the random-neuron baseline"""
    layers: Optional[str] = None
    """layers to search (default: the last --last-k layers)"""
    last_k: int = 3
    """search the last K layers"""
    per_layer: int = 20
    """neurons per layer"""
    rank_by: Literal["dot", "cos", "kurtosis", "skew"] = "dot"
    """congruence statistic to rank by"""
    kind: Literal["prediction", "suppression"] = "prediction"
    """prediction (positive) or suppression (negative) neurons"""
    require_space: bool = flag(default=True, negative_prefix="--no-")
    """require the token to start with a space"""
    min_chars: int = 3
    """minimum characters of the token"""
    reject_file: Optional[str] = None
    """file of tokens to reject, one per line (replaces the built-in list)"""
    seed: int = 0
    """seed of the random set"""
    unembed: Literal["centred", "raw"] = "centred"
    """W_U centred over the vocabulary (TransformerLens' center_unembed; the softmax ignores a constant shift) or raw"""

    def __post_init__(self):
        check(self.last_k >= 1 and self.per_layer >= 1, "--last-k and --per-layer must be at least 1")
        check(self.min_chars >= 0, "--min-chars must be 0 or more")


@dataclass(frozen=True)
class MineOptions:
    """One forward pass over the corpus serves every neuron; prompts end at the activating token and are trimmed
    to the shortest suffix keeping --keep of the activation. Writes RUN/neurons/mine.json."""

    which: Which = field(default="top", alias=["--set"])
    """neuron set"""
    corpus: str = "default"
    """corpus spec (see headscope.data)"""
    seq_len: int = 128
    """tokens per sequence"""
    top_k: int = 20
    """train prompts per neuron"""
    top_k_test: int = 20
    """held-out prompts per neuron"""
    keep: float = 0.8
    """fraction of the activation trimming keeps"""
    max_prompt_tokens: int = 100
    """drop longer trimmed prompts"""
    trim_tolerance: float = 0.0
    """stop the trimming search once the kept length is within this fraction of the shortest (0: exact)"""
    max_tokens: Optional[int] = None
    """mine at most this many tokens per split"""
    batch_size: int = 16
    """sequences per forward pass"""

    def __post_init__(self):
        for n in ("seq_len", "top_k", "top_k_test", "max_prompt_tokens", "batch_size"):
            check(getattr(self, n) >= 1, f"--{n.replace('_', '-')} must be at least 1")
        check(0 < self.keep <= 1, "--keep must be in (0, 1]")
        check(0 <= self.trim_tolerance < 1, "--trim-tolerance must be in [0, 1)")
        check(self.max_tokens is None or self.max_tokens >= 1, "--max-tokens must be at least 1")


@dataclass(frozen=True)
class AttributeOptions:
    """A = <head result, folded neuron input direction> at the prompt's last token for every eligible head;
    active when A > mean + K·σ. Writes RUN/neurons/attribution.json and attribution.safetensors."""

    which: Which = field(default="top", alias=["--set"])
    """neuron set"""
    gated: Literal["full", "gate", "up"] = "full"
    """gated MLPs: first-order term(s)"""
    norm_scale: bool = flag(default=True, negative_prefix="--no-")
    """divide by the norm's σ"""
    k_sigma: float = 2.0
    """active: A > mean + K·σ"""
    low: float = 0.25
    """explain heads active on ≥ LOW of prompts"""
    high: float = 0.75
    """explain heads active on ≤ HIGH of prompts"""
    batch_size: int = 32
    """prompts per forward pass"""

    def __post_init__(self):
        check(0 <= self.low <= self.high <= 1, "need 0 <= --low <= --high <= 1")
        check(self.batch_size >= 1, "--batch-size must be at least 1")


@dataclass(frozen=True)
class AblateOptions:
    """Drop in P(token) when a head is zeroed, on prompts where it is active vs inactive: per-pair Mann–Whitney
    with BH, per-neuron effect with a bootstrap interval and a Wilcoxon test; compared with the random neurons
    when both sets are ablated."""

    which: Which = field(default="top", alias=["--set"])
    """neuron set"""
    max_pairs: Optional[int] = None
    """ablate at most this many pairs"""
    mode: Literal["z", "value"] = "z"
    """zero the head's z slice, or its KV group's values (GQA: all heads of the group)"""
    batch_size: int = 32
    """prompts per forward pass"""

    def __post_init__(self):
        check(self.max_pairs is None or self.max_pairs >= 1, "--max-pairs must be at least 1")
        check(self.batch_size >= 1, "--batch-size must be at least 1")
