"""The typed results of the neuron stages (what ``run.neurons.find()`` … ``run.neurons.ablate()`` return and
the stage records keep). The artifacts themselves are RUN/neurons/ (``top``) and RUN/neurons/random/
(``random``): ``find.json``, ``mine.json``, ``attribution.json`` / ``.safetensors``, ``ablation.json`` /
``.safetensors`` (``run.neurons.load(which=...)`` reads them); these results are their headline counts and
tests, with the field names ``bench/readings.py`` turns into docs/readings.md rows
(``neurons.ablate.effect.mean``, …)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..results import Result


@dataclass(frozen=True)
class MeanCI(Result):
    """The mean over independent units (here: neurons) with its percentile-bootstrap 95 % interval
    (:func:`headscope.neurons.stats.bootstrap_mean`; ``low``/``high`` None below two units)."""

    mean: float | None = None
    low: float | None = None
    high: float | None = None
    n: int = 0


@dataclass(frozen=True)
class DiffCI(Result):
    """A difference of two means with its percentile-bootstrap 95 % interval
    (:func:`headscope.neurons.stats.bootstrap_diff_of_means`)."""

    diff: float | None = None
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class WilcoxonTest(Result):
    """Wilcoxon signed-rank test against 0 (:func:`headscope.neurons.stats.wilcoxon_signed`)."""

    W: float | None = None
    p: float | None = None
    n: int = 0
    n_nonzero: int = 0


@dataclass(frozen=True)
class MannWhitneyTest(Result):
    """Two-sided Mann–Whitney U test (:func:`headscope.neurons.stats.mann_whitney`); ``auc`` = U/(n1·n2)."""

    U: float | None = None
    p: float | None = None
    n1: int = 0
    n2: int = 0
    auc: float | None = None


@dataclass(frozen=True)
class AblationVsRandom(Result):
    """Per-neuron ablation effects of the congruent (``top``) against the random neurons (the control);
    also RUN/neurons/ablation_vs_random.json (:func:`headscope.neurons.stages.compare_ablations`)."""

    unit: str = "neuron"
    top: MeanCI = field(default_factory=MeanCI)
    random: MeanCI = field(default_factory=MeanCI)
    difference: DiffCI = field(default_factory=DiffCI)
    """top − random"""
    mann_whitney: MannWhitneyTest = field(default_factory=MannWhitneyTest)


@dataclass(frozen=True)
class FindResult(Result):
    """``neurons.find``: how many next-token neurons were chosen (the list is ``<set>/find.json``)."""

    which: str
    """``top`` (congruent neurons) or ``random`` (the random-neuron control)"""
    neurons: int
    per_layer: dict[str, dict[str, int]]
    """layer → {"candidates": neurons of the layer, "passed": those whose token passes the filters}"""


@dataclass(frozen=True)
class MineResult(Result):
    """``neurons.mine``: the max-activating train and held-out prompts mined (``<set>/mine.json``)."""

    which: str
    neurons: int
    train_prompts: int
    test_prompts: int
    prompt_documents: dict[str, int]
    """"train"/"test" → how many distinct documents the prompts come from (the clustering unit)"""
    mean_prompt_tokens: float | None
    """mean length of the trimmed prompts; None when no prompt was kept"""
    documents_scanned: dict[str, int | None]
    """corpus split ("train", "heldout") → documents the mining pass read (None: not recorded)"""


@dataclass(frozen=True)
class AttributeResult(Result):
    """``neurons.attribute``: the (neuron, head) pairs to explain (heads active on 25–75 % of a neuron's
    train prompts; ``<set>/attribution.json``)."""

    which: str
    pairs: int
    neurons_with_pairs: int


@dataclass(frozen=True)
class AblateResult(Result):
    """``neurons.ablate``: the causal check. The unit is the neuron: ``effect`` is the mean over neurons of
    the per-neuron effect (mean drop in P(token) where the head was active − where it was not, on held-out
    prompts) with its bootstrap interval, ``wilcoxon`` tests it against 0; ``significant_bh``: pairs with
    document-clustered BH q < 0.05. ``vs_random``: against the random neurons, once both sets were
    ablated (None before). Per-pair rows are ``<set>/ablation.json``."""

    which: str
    pairs: int
    neurons: int
    effect: MeanCI
    wilcoxon: WilcoxonTest
    significant_bh: int
    vs_random: AblationVsRandom | None = None
