"""The head-scores instrument: ``headscope heads score`` and the study's ``[heads.score]`` table."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..options import check
from ..registry import Instrument
from ..runs import Stage
from .options import RolesOptions
from .role_result import RolesResult


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


def report(summary: dict, opts: ScoreOptions, run) -> None:
    """Print the top heads of each score (read from RUN/heads/scores.json)."""
    from ..runs import read_json
    from .scores import SCORES, top_heads
    doc = read_json(run / "heads" / "scores.json")
    print(f"head scores ({doc['n_layers']} layers × {doc['n_heads']} heads) in {run / 'heads'}")
    for name in SCORES:
        tops = ", ".join(f"{l}.{h}={v:.2f}" for l, h, v in top_heads(doc["scores"][name]))
        print(f"  top {name.replace('_', '-')} heads: {tops}")
    if doc.get("prefix_induction"):
        longest = doc["prefix_induction"]["scores"][-1]
        tops = ", ".join(f"{l}.{h}={v:.2f}" for l, h, v in top_heads(longest))
        print(f"  top prefix-induction heads (prefix {doc['prefix_induction']['prefix_lengths'][-1]}): {tops}")


def report_roles(result, opts, run) -> None:
    """Print the role census: per role, heads shown / ablated / confirmed, and what its control gives."""
    cen = result.census if hasattr(result, "census") else result.get("census", {})
    n = result.n_heads if hasattr(result, "n_heads") else result.get("n_heads")
    print(f"head roles of {n} heads in {run / 'heads' / 'roles.json'} (shown: score > control, BH q ≤ {opts.q}; "
          "confirmed: and its causal test passed)")
    for role, c in cen.items():
        ctrl = "" if c["control_over_threshold"] is None else f"; control ({c['control_name']}) over the " \
                                                               f"threshold: {c['control_over_threshold']} heads"
        conf = f"{c['confirmed']} confirmed of {c['ablated']} ablated" if c["causal"] else "no causal test"
        print(f"  {role.replace('_', '-'):17s} shown {c['shown']:3d}, {conf}{ctrl}")
    agr = result.agreement if hasattr(result, "agreement") else result.get("agreement", {})
    if agr.get("spearman") is not None:
        print(f"  attribution-patching screen vs real ablation: Spearman {agr['spearman']:.2f} over {agr['n']} heads")


INSTRUMENT = Instrument(
    name="heads",
    help="head scores on synthetic sequences",
    stages=(
        Stage("heads.score", ScoreOptions, "headscope.heads.scores:run_head_scores",
              writes=lambda o: ["heads/scores.json", "heads/scores.safetensors"],
              doc="induction, previous-token, duplicate-token and prefix-induction scores of every head",
              report="headscope.heads.instrument:report"),
        Stage("heads.roles", RolesOptions, "headscope.heads.roles:run_roles",
              writes=lambda o: ["heads/roles.json", "heads/roles.safetensors"],
              doc="role battery of every head (induction, previous/duplicate-token, prefix induction, sink, local, "
                  "copying, copy suppression, successor) with controls, CIs, BH and causal checks",
              report="headscope.heads.instrument:report_roles", result=RolesResult),
    ),
    atlas_data="headscope.heads.atlas_data:atlas_data",
)
