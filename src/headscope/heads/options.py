"""The heads instrument's options (``headscope heads score|roles`` flags, the study's ``[heads.score]`` and
``[heads.roles]`` keys), declared once. A leaf module: it imports nothing of headscope but
:mod:`headscope.options`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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


@dataclass(frozen=True)
class RolesOptions:
    """The role battery of every head (docs/roles.md): scores on held-out natural text, repeated random tokens,
    copied prefixes, ordinal token sets and the weights, each against a control with a CI and BH over heads;
    an attribution-patching screen of every head on each role's task and real ablations of the heads a role
    shows and of the screen's top heads. Writes RUN/heads/roles.json and roles.safetensors."""

    corpus: str = "default"
    """corpus of the natural-text sample (its held-out split)"""
    seq_len: int = 128
    """tokens per natural-text window (BOS + seq_len − 1)"""
    text_seqs: int = 32
    """natural-text windows, drawn across the documents of the held-out split"""
    rep_seqs: int = 24
    """repeated random-token sequences [BOS, r, r] for the induction / previous / duplicate-token scores"""
    half_len: int = 30
    """length of each random half"""
    prefix_examples: int = 24
    """copied-prefix examples (prefix induction, arXiv 2406.17759); 0 skips the role"""
    prefix_len: int = 4
    """length of the copied prefix"""
    prefix_seq_len: int = 64
    """tokens per copied-prefix example"""
    task_seqs: int = 8
    """sequences per causal task (disjoint from the scoring data)"""
    task_len: int = 64
    """tokens per natural-text sequence of the causal tasks (the first task_len of a held-out window; at most
    --seq-len)"""
    ioi_prompts: int = 16
    """IOI prompts of the duplicate-token causal task (each with its ABC twin, whose subject is not repeated);
    0 skips the task (the role is then shown only)"""
    confirm_top: int = 4
    """per role, the heads with the largest attribution-patching estimate that are also ablated for real"""
    max_ablations: int = 12
    """per role, at most this many of the heads it shows are ablated for real (highest score first); a shown
    head left out stays shown, never confirmed"""
    ablation: Literal["mean", "resample"] = "mean"
    """mean: a head's z replaced by its mean over the task's positions; resample: by its z on another sequence"""
    attn_threshold: float = 0.3
    """attention roles (induction, previous/duplicate-token, prefix induction, sink, local): the score must
    reach this fraction of attention"""
    successor_threshold: float = 0.4
    """succession score a successor head must reach (a public replication of Gould et al. uses 0.4)"""
    copy_threshold: float = 0.1
    """copying / copy suppression: mean direct-logit gap (attended − random context token, logits) to reach"""
    sink_kl_bound: float = 0.01
    """sink heads' causal test: the upper CI bound of KL(clean ‖ ablated) (nats/token) must stay below this"""
    null_draws: int = 64
    """random OV circuits per layer for the weight copying score's null"""
    q: float = 0.05
    """Benjamini–Hochberg false-discovery rate over heads"""
    batch_size: int = 8
    """sequences per forward pass"""
    seed: int = 0
    """seed of the windows, random sequences and controls"""

    def __post_init__(self):
        for name in ("seq_len", "text_seqs", "rep_seqs", "half_len", "task_seqs", "batch_size", "prefix_len"):
            check(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
        check(self.prefix_seq_len >= 2 * self.prefix_len + 12, "--prefix-seq-len must be at least "
              "2 · --prefix-len + 12 (the prefix, its copy and a gap)")
        check(self.task_len >= 16, "--task-len must be at least 16")
        check(self.seq_len >= 16, "--seq-len must be at least 16 (offsets up to 8 and beyond are measured)")
        check(self.text_seqs >= 2 and self.task_seqs >= 2, "--text-seqs and --task-seqs must be at least 2 "
              "(confidence intervals need two sequences)")
        check(self.rep_seqs >= 2, "--rep-seqs must be at least 2")
        check(min(self.prefix_examples, self.confirm_top, self.max_ablations) >= 0,
              "--prefix-examples, --confirm-top and --max-ablations must be 0 or more")
        check(self.ioi_prompts == 0 or self.ioi_prompts >= 4, "--ioi-prompts must be 0 (no duplicate-token "
              "causal task) or at least 4")
        check(self.null_draws == 0 or self.null_draws >= 2, "--null-draws must be 0 (no null) or at least 2")
        check(0 < self.q < 1, "--q must be in (0, 1)")
        check(0 < self.attn_threshold <= 1, "--attn-threshold must be in (0, 1]")
        check(0 < self.successor_threshold <= 1, "--successor-threshold must be in (0, 1]")
        check(self.copy_threshold >= 0 and self.sink_kl_bound > 0,
              "--copy-threshold must be >= 0 and --sink-kl-bound > 0")
