"""The typed results of the explain stages (what ``run.explain.<step>()`` returns and the stage records keep).

Their fields carry the names the stage summaries had, so the record's ``result`` (and the rows of
docs/readings.md made from it, e.g. ``explain.score.by_neuron.mean``) keep their keys. The per-pair and
per-feature rows are in the stage's JSON artifact, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..results import Result


@dataclass(frozen=True)
class ExplainRunResult(Result):
    """``explain.run``: how many (neuron, head) pairs have an explanation in
    ``explain/[random/]explanations_<backend>.json``."""

    pairs: int
    new: int
    """pairs explained by this call (the others were kept from an earlier, resumed call)"""
    backend: str = ""


@dataclass(frozen=True)
class ExplainScoreResult(Result):
    """``explain.score``: E of the pairs (over pairs: ``n``/``mean``/``std``/``skew``) and per neuron (the
    independent unit), with the controls; per-pair E, its document-clustered interval and p in
    ``explain/[random/]scores_<backend>.json``."""

    pairs: int
    scored: int
    skipped: int
    n: int
    mean: float | None
    std: float | None
    skew: float | None
    by_neuron: dict
    """per-neuron mean E: {mean, low, high, n} (bootstrap 95 % over neurons)"""
    significant_bh: int
    """pairs above chance after BH over the pairs' document-clustered p-values"""
    lookups: int
    """pairs significant and above the ‖z‖-only baseline"""
    unit: str = "neuron"
    control: dict | None = None
    """shuffled explanations (another neuron's): {by_neuron, vs_control (Wilcoxon over neurons), neurons}"""
    same_head: dict | None = None
    """the same head's explanation for another neuron: {by_neuron, vs_explanation, neurons}"""
    norm: dict | None = None
    """‖z‖ alone: {by_neuron, vs_explanation, neurons}"""
    probe: dict | None = None
    """a probe on z (the ceiling): {by_neuron, vs_explanation, neurons}"""


@dataclass(frozen=True)
class ComparisonResult(Result):
    """``explain.baseline`` (and ``explain compare``): per-neuron E of congruent vs random neurons
    (``explain/comparison_<scores>.json``)."""

    scores: str
    top: dict
    """describe + bootstrap mean of the congruent neurons' per-neuron E"""
    random: dict
    difference_of_means: dict
    mann_whitney: dict
    ks: dict
    power: dict
    """the smallest difference the comparison detects (80 % power, α 0.05)"""
    unit: str = "neuron"
    ablation_vs_random: dict | None = None
    """``explain.baseline`` when the congruent set was ablated: the same ablation on the random set, compared"""


@dataclass(frozen=True)
class FeatureExplainResult(Result):
    """``explain.features``: how many SAE features were explained, and their DFA families."""

    sae: str
    features: int
    backend: str
    skipped: int = 0
    """features drawn that had no shown or no test context in disjoint documents"""
    families: dict = field(default_factory=dict)
    """DFA family → number of features"""


@dataclass(frozen=True)
class FeatureScoresResult(Result):
    """``explain.score-features``: per scorer kind (``detection``, ``fuzzing``; None when not scored), the
    summary of :func:`headscope.explain.scorers.score_units`: balanced accuracy vs shuffled explanations,
    their difference (bootstrap over features and clustered by document)."""

    sae: str
    probabilities: str
    detection: dict | None = None
    fuzzing: dict | None = None


@dataclass(frozen=True)
class PairScoresResult(Result):
    """``explain.score-pairs``: the detection summary of the pairs' explanations vs shuffled explanations
    (:func:`headscope.explain.scorers.score_units`, difference clustered by document)."""

    probabilities: str
    detection: dict


@dataclass(frozen=True)
class LabelsResult(Result):
    """``explain.label``: heads with a label and with an LLM summary, and the labels file."""

    heads: int
    summaries: int
    path: str
