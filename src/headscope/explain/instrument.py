"""Written explanations of when a head drives a neuron, and their scores: ``headscope explain
run|score|baseline|compare`` and the study's ``[explain.*]`` tables (``[explain] backend = …`` is shared)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from simple_parsing import field
from simple_parsing.helpers import flag

from ..options import check
from ..registry import Instrument
from ..runs import Command, Stage

Which = Literal["top", "random"]


def _dir(which: str) -> str:
    return "explain" if which == "top" else "explain/random"


def _neurons(which: str) -> str:
    return "neurons" if which == "top" else "neurons/random"


@dataclass(frozen=True)
class BackendOptions:
    """The explainer / scorer back-end (shared by every explain step)."""

    backend: Literal["statistical", "openai", "local"] = "statistical"
    """statistical: offline sparse logistic regression over n-grams; openai: any OpenAI-compatible endpoint;
    local: a HF chat model in-process"""
    base_url: str = field(default_factory=lambda: os.environ.get("HEADSCOPE_BASE_URL", "https://api.openai.com/v1"))
    """OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 for vLLM"""
    llm: str = field(default_factory=lambda: os.environ.get("HEADSCOPE_LLM", "gpt-4o"))
    """model name at the endpoint"""
    api_key_env: str = "OPENAI_API_KEY"
    """environment variable holding the key"""
    concurrency: int = 4
    """requests in flight"""
    max_retries: int = 5
    """retries per request"""
    timeout: float = 60.0
    """seconds per request"""
    cache_dir: Optional[str] = None
    """response cache (default: RUN/explain/cache)"""
    explainer_model: str = "default"
    """local backend: model spec (default: the embedded model)"""
    max_terms: int = 5
    """statistical backend: at most this many terms in the rule"""
    window: int = 8
    """statistical backend: n-grams among the last WINDOW words count as near the end"""

    def __post_init__(self):
        from urllib.parse import urlparse
        u = urlparse(self.base_url)
        check(u.scheme in ("http", "https") and bool(u.netloc),
              f"--base-url {self.base_url!r} is not an http(s) URL")
        check(self.concurrency >= 1 and self.max_retries >= 0 and self.timeout > 0,
              "--concurrency >= 1, --max-retries >= 0 and --timeout > 0 are needed")
        check(self.max_terms >= 1 and self.window >= 1, "--max-terms and --window must be at least 1")

    def backend_kwargs(self, device: str = "cpu", dry_run: Path | None = None) -> dict:
        return {"base_url": self.base_url, "llm": self.llm, "api_key_env": self.api_key_env,
                "concurrency": self.concurrency, "max_retries": self.max_retries, "timeout": self.timeout,
                "cache_dir": Path(self.cache_dir) if self.cache_dir else None, "dry_run": dry_run,
                "local_model": self.explainer_model, "device": device, "max_terms": self.max_terms,
                "window": self.window}


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
    """Classifies balanced held-out prompts from the explanation alone; E = (TPR+TNR)/2 with a Wilson interval,
    a binomial test against chance, BH over pairs and a shuffled-explanation control."""

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
class DryRunOptions(BackendOptions):
    """Writes the requests an OpenAI-compatible endpoint would get to a JSONL file and estimates tokens; sends
    nothing."""

    jsonl: str = field(default="explain-requests.jsonl", positional=False)
    """where to write the requests"""
    which: Which = field(default="top", alias=["--set"])
    """neuron set"""
    max_pairs: Optional[int] = None
    """at most this many pairs"""
    max_examples: int = 10
    """active and inactive examples shown, each"""


def _backend(opts: BackendOptions, run, model, dry_run: Path | None = None):
    from .stages import make_backend
    return make_backend(opts.backend, run, model, **opts.backend_kwargs(str(model.device), dry_run))


def stage_run(model, run, opts: RunOptions, progress: bool = True) -> dict:
    from .stages import run_explain
    # force: every pair is explained afresh when the stage reruns (an endpoint's response cache still
    # answers identical requests without a call)
    return run_explain(model, run, _backend(opts, run, model), opts.which, max_pairs=opts.max_pairs,
                       max_examples=opts.max_examples, force=True, progress=progress)


def stage_score(model, run, opts: ScoreOptions, progress: bool = True) -> dict:
    from .stages import run_score
    return run_score(model, run, _backend(opts, run, model), opts.which, explanations=opts.explanations,
                     max_per_class=opts.max_per_class, min_per_class=opts.min_per_class, control=opts.control,
                     progress=progress)


def stage_baseline(model, run, opts: BaselineOptions, progress: bool = True) -> dict:
    from .stages import run_random_baseline
    return run_random_baseline(model, run, _backend(opts, run, model), seed=opts.seed, per_layer=opts.per_layer,
                               progress=progress)


def _score_file(o: ScoreOptions) -> str:
    ex = o.explanations or o.backend
    name = f"scores_{o.backend}.json" if ex == o.backend else f"scores_{ex}_by_{o.backend}.json"
    return f"{_dir(o.which)}/{name}"


def _print_summary(s: dict, what: str) -> None:
    f = lambda x: "n/a" if x is None else f"{x:.3f}"
    bn = s.get("by_neuron", s)
    line = (f"{what}: E mean {f(bn.get('mean'))} [{f(bn.get('low'))}, {f(bn.get('high'))}] over {bn.get('n', 0)} "
            f"neurons")
    if "scored" in s:
        line += f" ({s['scored']} pairs scored, {s.get('skipped', 0)} with too few held-out prompts of a class)"
    if "significant_bh" in s:
        line += f"; {s['significant_bh']} pairs above chance (BH q < 0.05)"
    if "control" in s:
        c = s["control"]["by_neuron"]
        line += f"; shuffled explanations {f(c.get('mean'))} [{f(c.get('low'))}, {f(c.get('high'))}]"
    print(line)


def report_run(summary: dict, opts: RunOptions, run) -> None:
    print(f"{summary.get('pairs')} pairs explained ({summary.get('new')} new) with the {opts.backend} backend")


def report_score(summary: dict, opts: ScoreOptions, run) -> None:
    _print_summary(summary, f"{opts.which} neurons, {opts.backend} scorer")


def report_compare(res: dict, opts=None, run=None) -> None:
    _print_summary(res["top"], "congruent neurons")
    _print_summary(res["random"], "random neurons")
    mw, ks, dm = res["mann_whitney"], res["ks"], res["difference_of_means"]
    f = lambda x: "n/a" if x is None else f"{x:.3g}"
    print(f"per neuron: congruent − random = {f(dm['diff'])} [{f(dm['low'])}, {f(dm['high'])}]; Mann–Whitney U = "
          f"{f(mw['U'])}, p = {f(mw['p'])}; KS D = {f(ks['D'])}, p = {f(ks['p'])}")


def cmd_compare(run, opts: CompareOptions) -> int:
    from .stages import run_compare
    report_compare(run_compare(None, run, opts.scores))
    return 0


def cmd_dry_run(model, run, opts: DryRunOptions) -> int:
    from .stages import run_explain
    check(opts.backend == "openai", "a dry run applies to --backend openai")
    dry = Path(opts.jsonl)
    if dry.exists():
        dry.unlink()
    res = run_explain(model, run, _backend(opts, run, model, dry), opts.which, max_pairs=opts.max_pairs,
                      max_examples=opts.max_examples, force=True, progress=False)
    print(f"dry run: {res['explain_requests']} explanation requests written to {res['dry_run']}; estimated "
          f"≈{res['explain_input_tokens']} input + ≤{res['explain_output_tokens_max']} output tokens to explain, "
          f"≈{res['score_input_tokens']} input + {res['score_output_tokens']} output tokens to score "
          f"({res['score_requests']} requests)")
    return 0


# -- SAE features, pair scores with baselines, head labels (issue 13) ---------------------------------------
def _feat(o, name: str) -> str:
    return f"explain/features/{o.sae}/{name}"


def _feature_dry_run_options():
    from .features import FeatureDryRunOptions
    return FeatureDryRunOptions


def _feature_stages():
    from .features import FeatureExplainOptions, FeatureScoreOptions, backend_name
    from .head_label import LabelOptions
    from .pair_scores import PairScoreOptions
    sae_in = lambda o: [f"sae/{o.sae}/cfg.json", f"sae/{o.sae}/sae_weights.safetensors",
                        f"sae/{o.sae}/dashboards/index.json"]
    return (
        Stage("explain.features", FeatureExplainOptions, "headscope.explain.features:run_explain_features",
              reads=sae_in,
              writes=lambda o: [_feat(o, "contexts.json"), _feat(o, f"explanations_{backend_name(o.backend)}.json")],
              doc="explanations of SAE features from max-activating and random held-out contexts",
              report="headscope.explain.reports:report_features"),
        Stage("explain.score-features", FeatureScoreOptions, "headscope.explain.features:run_score_features",
              reads=lambda o: [_feat(o, "contexts.json"), _feat(o, f"explanations_{o.explanations_name}.json")],
              writes=lambda o: [_feat(o, f"scores_{o.explanations_name}_by_{backend_name(o.backend)}.json")],
              doc="detection and fuzzing scores of feature explanations beside shuffled explanations",
              report="headscope.explain.reports:report_feature_scores"),
        Stage("explain.score-pairs", PairScoreOptions, "headscope.explain.pair_scores:run_score_pairs",
              reads=lambda o: [f"{_dir(o.which)}/explanations_{o.explanations or o.backend}.json",
                               f"{_neurons(o.which)}/attribution.json"],
              writes=lambda o: [f"{_dir(o.which)}/pair_scores_{o.explanations or o.backend}_by_{o.backend}.json"],
              doc="detection scores of (neuron, head) explanations beside shuffled explanations, with CIs",
              report="headscope.explain.reports:report_pair_scores"),
        Stage("explain.label", LabelOptions, "headscope.explain.head_label:run_labels",
              writes=lambda o: ["explain/labels.json"],
              doc="a one-line label per head from what headscope measured (+ an LLM summary)",
              report="headscope.explain.reports:report_labels"),
    )


INSTRUMENT = Instrument(
    name="explain",
    help="explain and score when each head drives a neuron",
    stages=(
        Stage("explain.run", RunOptions, "headscope.explain.instrument:stage_run",
              reads=lambda o: [f"{_neurons(o.which)}/attribution.json"],
              writes=lambda o: [f"{_dir(o.which)}/explanations_{o.backend}.json"],
              doc="written explanations of when each head drives a neuron",
              report="headscope.explain.instrument:report_run"),
        Stage("explain.score", ScoreOptions, "headscope.explain.instrument:stage_score",
              reads=lambda o: [f"{_dir(o.which)}/explanations_{o.explanations or o.backend}.json"],
              writes=lambda o: [_score_file(o)],
              doc="explanation scores on held-out prompts", report="headscope.explain.instrument:report_score"),
        Stage("explain.baseline", BaselineOptions, "headscope.explain.instrument:stage_baseline",
              reads=lambda o: [f"explain/scores_{o.backend}.json", "neurons/attribution.json"],
              writes=lambda o: [f"explain/comparison_{o.backend}.json"],
              doc="random-neuron baseline through the same pipeline, for comparison",
              report="headscope.explain.instrument:report_compare"),
    ) + _feature_stages(),
    commands=(
        Command("explain.compare", CompareOptions, "headscope.explain.instrument:cmd_compare",
                doc="E of congruent vs random neurons", needs_model=False),
        Command("explain.dry-run", DryRunOptions, "headscope.explain.instrument:cmd_dry_run",
                doc="write the endpoint requests to JSONL and estimate tokens; send nothing"),
        Command("explain.features-dry-run", _feature_dry_run_options(), "headscope.explain.features:cmd_features_dry_run",
                doc="write the feature-explanation requests to JSONL; send nothing"),
    ),
    atlas_data="headscope.explain.atlas_data:atlas_data",
)
