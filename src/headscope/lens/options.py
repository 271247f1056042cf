"""Options of the lens stages declared here (a leaf module: it imports only ``headscope.options``).

``SteerEvalOptions``: ``headscope lens steer-eval`` / the study's ``[lens.steer_eval]`` table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from simple_parsing import field

from ..options import check


@dataclass(frozen=True)
class SteerEvalOptions:
    """Steering through single heads, measured: target tokens × held-out prompts × heads × strengths, four
    directions (the token's unembedding row, the lens direction, a random direction of the same norm, and
    the unembedding row added to the residual stream at the residual stream's scale); success (Δ log₂ p of
    the target at the next position, its rate in the next tokens) against cost (KL on unrelated prompts,
    perplexity of the continuation under the clean model), CIs over tokens, BH over heads."""

    tokens: Optional[str] = None
    """file with one target word per line (default: the built-in list of concrete nouns)"""
    n_tokens: int = 16
    """target tokens drawn (seeded) from the single-token words of the list"""
    prompts: Optional[str] = None
    """file with one prompt per line (default: held-out windows of the lenses' corpus, one per document)"""
    n_prompts: int = 4
    """prompts the success is measured on"""
    n_cost_prompts: int = 2
    """unrelated prompts (other documents) the KL cost is measured on"""
    prompt_len: int = 16
    """tokens per held-out window prompt (after BOS)"""
    heads: Optional[str] = None
    """sites '18.6,17.4' (default: the informative heads of lens eval with the largest gain)"""
    max_heads: int = 3
    """heads taken from lens eval when --heads is not given"""
    strengths: list[float] = field(default_factory=lambda: [2.0, 8.0])
    """head edits: the vector's norm in units of the head's mean output norm on the prompts"""
    resid_strengths: list[float] = field(default_factory=lambda: [0.25, 1.0])
    """residual-stream reference: the vector's norm in units of the residual stream's mean norm there"""
    new_tokens: int = 4
    """greedy tokens generated per prompt (target rate, continuation perplexity)"""
    seed: int = 0
    """draw of tokens, prompts and random directions"""

    def __post_init__(self):
        check(2 <= self.n_tokens <= 10000, "--n-tokens must be in 2..10000 (the CI is over tokens)")
        check(1 <= self.n_prompts <= 10000, "--n-prompts must be in 1..10000")
        check(1 <= self.n_cost_prompts <= 10000, "--n-cost-prompts must be in 1..10000")
        check(2 <= self.prompt_len <= 4096, "--prompt-len must be in 2..4096")
        check(1 <= self.max_heads <= 100000, "--max-heads must be at least 1")
        check(len(self.strengths) >= 1 and all(s > 0 for s in self.strengths), "--strengths: give positive values")
        check(len(self.resid_strengths) >= 1 and all(s > 0 for s in self.resid_strengths),
              "--resid-strengths: give positive values")
        check(1 <= self.new_tokens <= 256, "--new-tokens must be in 1..256")
