"""The explanation options (``headscope explain`` flags, the study's ``[explain.*]`` keys), declared once:
the back-ends (:class:`BackendOptions` for the (neuron, head) pair steps, :class:`LLMOptions` for the
feature, pair-score and label steps) and every step's options. A leaf module: it imports nothing of
headscope but :mod:`headscope.options` and :mod:`headscope.errors`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Optional

from simple_parsing import field
from simple_parsing.helpers import flag

from ..errors import HeadscopeError
from ..options import check


KINDS = ("detection", "fuzzing")


Which = Literal["top", "random"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise HeadscopeError(msg)


@dataclass(frozen=True)
class LLMOptions:
    """Where an LLM back-end runs: the one declaration shared by every explain step (the pair steps'
    :class:`BackendOptions` add the back-end choice and the offline explainer's knobs)."""

    llm: str = field(default_factory=lambda: os.environ.get("HEADSCOPE_LLM", "gpt-4o"))
    """openai backend: model name at the endpoint"""
    base_url: str = field(default_factory=lambda: os.environ.get("HEADSCOPE_BASE_URL", "https://api.openai.com/v1"))
    """openai backend: OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 for vLLM"""
    explainer_model: str = "default"
    """local backend: model spec (default: the embedded model)"""
    api_key_env: str = "OPENAI_API_KEY"
    """openai backend: environment variable holding the key"""
    concurrency: int = 4
    """openai backend: requests in flight"""
    max_retries: int = 5
    """openai backend: retries per request"""
    timeout: float = 60.0
    """openai backend: seconds per request"""
    backoff: float = 1.0
    """openai backend: seconds before the first retry (doubling each retry)"""
    cache_dir: Optional[str] = None
    """openai backend: response cache (default: RUN/explain/cache)"""

    def __post_init__(self):
        from urllib.parse import urlparse
        u = urlparse(self.base_url)
        _check(u.scheme in ("http", "https") and bool(u.netloc),
               f"--base-url {self.base_url!r} is not an http(s) URL")
        _check(self.concurrency >= 1 and self.max_retries >= 0 and self.timeout > 0 and self.backoff >= 0,
               "--concurrency >= 1, --max-retries >= 0, --timeout > 0 and --backoff >= 0 are needed")


@dataclass(frozen=True)
class BackendOptions(LLMOptions):
    """The explainer / scorer back-end of the (neuron, head) pair steps: which back-end, where it runs
    (:class:`LLMOptions`) and the offline explainer's knobs."""

    backend: Literal["statistical", "openai", "local"] = "statistical"
    """statistical: offline sparse logistic regression over n-grams; openai: any OpenAI-compatible endpoint;
    local: a HF chat model in-process"""
    max_terms: int = 5
    """statistical backend: at most this many terms in the rule"""
    window: int = 8
    """statistical backend: n-grams among the last WINDOW words count as near the end"""

    def __post_init__(self):
        super().__post_init__()
        check(self.max_terms >= 1 and self.window >= 1, "--max-terms and --window must be at least 1")


@dataclass(frozen=True)
class RunOptions(BackendOptions):
    """Explains each (neuron, head) pair from its active and inactive train prompts."""

    which: Which = field(default="top", alias=["--set"])
    """neuron set"""
    max_pairs: Optional[int] = None
    """explain at most this many pairs"""
    max_examples: Optional[int] = None
    """active and inactive examples shown, each (default: every train prompt; the explainer learns more
    from more)"""


@dataclass(frozen=True)
class ScoreOptions(BackendOptions):
    """Classifies balanced held-out prompts from the explanation alone; E = (TPR+TNR)/2 with an interval and a
    test against chance clustered by the prompts' documents, BH over pairs, and shuffled-explanation,
    same-head, ‖z‖ and probe controls."""

    which: Which = field(default="top", alias=["--set"])
    """neuron set"""
    explanations: Optional[str] = None
    """score another backend's explanations (default: the scorer's)"""
    max_per_class: int = 20
    """held-out prompts per class and pair (as many active as inactive)"""
    min_per_class: int = 5
    """score a pair only with at least this many held-out prompts of each class"""
    control: bool = flag(default=True, negative_prefix="--no-")
    """also score each pair with another neuron's explanation (doubles the scorer's calls)"""

    def __post_init__(self):
        super().__post_init__()
        check(1 <= self.min_per_class <= self.max_per_class, "need 1 <= --min-per-class <= --max-per-class")


@dataclass(frozen=True)
class BaselineOptions(BackendOptions):
    """The random-neuron baseline through the same pipeline (find, mine, attribute, explain, score), then the
    comparison with the congruent neurons."""

    seed: int = 0
    """seed of the random neurons"""
    per_layer: Optional[int] = None
    """random neurons per layer (default: as many as the congruent set)"""


@dataclass(frozen=True)
class CompareOptions:
    """Per-neuron E of congruent vs random neurons: bootstrap difference of means, Mann–Whitney, KS."""

    scores: str = "statistical"
    """which backend's scores"""


@dataclass(frozen=True)
class DryRunOptions(RunOptions):
    """Writes the requests an OpenAI-compatible endpoint would get for ``explain run`` (same pairs, same
    examples) to a JSONL file and estimates tokens for explaining and scoring; sends nothing."""

    jsonl: str = field(default="explain-requests.jsonl", positional=False)
    """where to write the requests"""


def backend_name(backend: str) -> str:
    """File-name form of a feature back-end: ``keyword`` (the pair explainer's old name, which a study's
    shared ``[explain] backend`` may carry) is the offline ``statistical`` explainer."""
    return "statistical" if backend in ("keyword", "statistical") else backend


@dataclass(frozen=True)
class FeatureExplainOptions(LLMOptions):
    """Explain SAE features from their max-activating and random held-out contexts."""

    sae: str = ""
    """SAE name under RUN/sae/ (required, e.g. L14)"""
    backend: Literal["statistical", "keyword", "dfa", "openai", "local"] = "statistical"
    """statistical (= keyword): offline token-rate rule; dfa: offline attention-source rule (family + token
    sets from the examples' DFA); openai: any OpenAI-compatible endpoint; local: HF chat model"""
    features: int = 64
    """features explained, drawn at random among the alive ones (0: all; fewer are a subset of more)"""
    n_explain: int = 10
    """max-activating contexts shown, and as many random held-out contexts"""
    n_test: int = 10
    """held-out activating and non-activating contexts per feature kept for scoring"""
    windows: int = 2000
    """random held-out windows encoded (the random and non-activating contexts come from them)"""
    seed: int = 0
    """which features and windows"""

    def __post_init__(self):
        super().__post_init__()
        _check(bool(self.sae), "--sae is required: the SAE's name under RUN/sae/ (e.g. L14)")
        _check(self.features >= 0, "--features must be at least 0")
        _check(self.n_explain >= 1, "--n-explain must be at least 1")
        _check(self.n_test >= 1, "--n-test must be at least 1")
        _check(self.windows >= 2, "--windows must be at least 2")


@dataclass(frozen=True)
class FeatureScoreOptions(LLMOptions):
    """Score feature explanations: detection and fuzzing, each beside the shuffled-explanation baseline."""

    sae: str = ""
    """SAE name under RUN/sae/ (required, e.g. L14)"""
    backend: Literal["statistical", "keyword", "dfa", "openai", "local"] = "statistical"
    """the judge (statistical = keyword: the offline token rule; dfa: the offline attention-source rule)"""
    explanations: str = ""
    """whose explanations to score (default: the judge's own back-end)"""
    scorers: list[str] = field(default_factory=lambda: ["detection", "fuzzing"])
    """detection and/or fuzzing"""
    seed: int = 0
    """the shuffled-explanation derangement and the bootstrap"""

    def __post_init__(self):
        super().__post_init__()
        _check(bool(self.sae), "--sae is required: the SAE's name under RUN/sae/ (e.g. L14)")
        bad = [s for s in self.scorers if s not in KINDS]
        _check(not bad and len(self.scorers) > 0, f"--scorers: choose from {', '.join(KINDS)} (got {bad})")

    @property
    def explanations_name(self) -> str:
        return backend_name(self.explanations or self.backend)


@dataclass(frozen=True)
class FeatureDryRunOptions(FeatureExplainOptions):
    """Write the feature-explanation requests an OpenAI-compatible endpoint would get to JSONL; send nothing
    (the contexts are computed and written, since the requests show them)."""

    jsonl: str = "explain-feature-requests.jsonl"
    """where to write the requests"""


@dataclass(frozen=True)
class PairScoreOptions(LLMOptions):
    """Detection scores of (neuron, head) explanations beside shuffled explanations, with CIs."""

    backend: str = "statistical"
    """the judge: a pair back-end of `headscope explain score` (statistical, openai, local)"""
    explanations: str = ""
    """whose explanations to score (default: the judge's own back-end)"""
    which: Literal["top", "random"] = "top"
    """the congruent neuron set or the random-neuron baseline set"""
    max_per_class: int = 20
    """held-out prompts of each class (active / inactive) per pair, drawn balanced as `explain score` does"""
    min_per_class: int = 5
    """pairs with fewer held-out prompts of a class are not scored"""
    seed: int = 0
    """the shuffled-explanation derangement and the bootstrap"""

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.min_per_class <= self.max_per_class:
            raise HeadscopeError("need 1 <= --min-per-class <= --max-per-class")


@dataclass(frozen=True)
class LabelOptions(LLMOptions):
    """A one-line label per head from headscope's measurements, plus an LLM summary."""

    summary: Literal["none", "openai", "local"] = "none"
    """none: the facts only; openai / local: also a summary written by that back-end"""
    top_frac: float = 0.05
    """quote a head score when the head ranks in this top fraction of all heads"""
    max_facts: int = 6
    """facts in the one-line label"""

    def __post_init__(self):
        super().__post_init__()
        check(0 < self.top_frac <= 1, "--top-frac must be in (0, 1]")
        check(self.max_facts >= 1, "--max-facts must be at least 1")
