"""The typed results of the SAE stages (what ``run.sae.<step>()`` returns and the stage records keep)."""

from __future__ import annotations

from dataclasses import dataclass

from ..results import Result


@dataclass(frozen=True)
class SAETrainResult(Result):
    """``sae.train``: the SAE trained (RUN/sae/<name>/train.json has the history)."""

    name: str
    layer: int
    n_steps: int | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    final: dict | None = None
    """the last logged step: loss, mse, l0, fve, dead_frac, lr"""


@dataclass(frozen=True)
class SAEImportResult(Result):
    """``sae.import``: the pretrained SAE now in RUN/sae/<name>/."""

    name: str
    layer: int
    architecture: str
    d_sae: int
    head_index: int | None = None


@dataclass(frozen=True)
class SAEEvalResult(Result):
    """``sae.eval``: the headline metrics of RUN/sae/<name>/eval.json (CIs and per-document sums there)."""

    name: str
    layer: int
    n_tokens: int
    n_documents: int
    l0: float
    fve: float | None
    dead_frac: float
    dense_frac: float
    ce_recovered_zero: float | None
    ce_recovered_mean: float | None
    kl_recovered_zero: float | None
    kl_recovered_mean: float | None
    headline: dict
    """the first meaningful recovered score with its CI (see sae/evaluate.py)"""


@dataclass(frozen=True)
class SAEDashboardsResult(Result):
    """``sae.dashboards``: how many features are alive on the scanned tokens."""

    alive: int | None = None


@dataclass(frozen=True)
class SAEIoiResult(Result):
    """``sae.ioi``: the IOI worked example's logit differences (per-feature effects in RUN/sae/<name>/ioi.json)."""

    name: str
    layer: int
    n_prompts: int
    position: str
    logit_diff_clean: float
    logit_diff_clean_abba: float
    logit_diff_clean_baba: float
    logit_diff_sae_spliced_at_s2: float
    frac_prompts_io_preferred: float
    n_live_features: int
    examples: list[str]


@dataclass(frozen=True)
class SAEAnalysisResult(Result):
    """``sae.analysis``: the polysemanticity test over the heads and its power (per head in
    RUN/sae/<name>/heads.json)."""

    name: str
    layer: int
    heads: int
    polysemantic_frac: float
    """heads called polysemantic (BH over heads)"""
    structured_frac: float
    """heads with any structure beyond the null (polysemantic or one group)"""
    null_polysemantic_frac: dict
    """{untrained, permuted}: the same test's rate on the nulls' own draws (the negative control)"""
    uncalibrated: dict
    """the old fixed rule on the real SAE and on both nulls"""
    power: dict | None = None
    """{planted, detected, heads, by_group_size {g: {planted, detected, rate, heads_power_80}}, cos, per_head,
    how}; None when not measured (n_planted = 0)"""
