"""Written explanations of when a head drives a neuron, and their scores: ``headscope explain
run|score|baseline|compare`` and the study's ``[explain.*]`` tables (``[explain] backend = …`` is shared)."""

from __future__ import annotations


from ..options import check
from ..registry import Instrument
from ..runs import Command, Stage
from .options import (BaselineOptions, CompareOptions, DryRunOptions, FeatureDryRunOptions,
                      FeatureExplainOptions, FeatureScoreOptions, LabelOptions, PairScoreOptions, RunOptions,
                      ScoreOptions, backend_name)
from .results import (ComparisonResult, ExplainRunResult, ExplainScoreResult, FeatureExplainResult,
                      FeatureScoresResult, LabelsResult, PairScoresResult)


def _dir(which: str) -> str:
    return "explain" if which == "top" else "explain/random"


def _neurons(which: str) -> str:
    return "neurons" if which == "top" else "neurons/random"


def _score_file(o: ScoreOptions) -> str:
    ex = o.explanations or o.backend
    name = f"scores_{o.backend}.json" if ex == o.backend else f"scores_{ex}_by_{o.backend}.json"
    return f"{_dir(o.which)}/{name}"


def _print_summary(s: dict, what: str) -> None:
    """One line of E per neuron (``s``: a score summary or one side of a comparison, as JSON)."""
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


def report_run(res: ExplainRunResult, opts: RunOptions, run) -> None:
    print(f"{res.pairs} pairs explained ({res.new} new) with the {opts.backend} backend")


def report_score(res: ExplainScoreResult, opts: ScoreOptions, run) -> None:
    _print_summary(res.to_json(), f"{opts.which} neurons, {opts.backend} scorer")


def report_compare(res: ComparisonResult, opts=None, run=None) -> None:
    _print_summary(res.top, "congruent neurons")
    _print_summary(res.random, "random neurons")
    mw, ks, dm = res.mann_whitney, res.ks, res.difference_of_means
    f = lambda x: "n/a" if x is None else f"{x:.3g}"
    print(f"per neuron: congruent − random = {f(dm['diff'])} [{f(dm['low'])}, {f(dm['high'])}]; Mann–Whitney U = "
          f"{f(mw['U'])}, p = {f(mw['p'])}; KS D = {f(ks['D'])}, p = {f(ks['p'])}")


def cmd_compare(run, opts: CompareOptions) -> int:
    from .stages import run_compare
    report_compare(run_compare(run, opts))
    return 0


def cmd_dry_run(model, run, opts: DryRunOptions) -> int:
    from .stages import dry_run_estimate
    check(opts.backend == "openai", "a dry run applies to --backend openai")
    res = dry_run_estimate(model, run, opts)
    print(f"dry run: {res['explain_requests']} explanation requests written to {res['dry_run']}; estimated "
          f"≈{res['explain_input_tokens']} input + ≤{res['explain_output_tokens_max']} output tokens to explain, "
          f"≈{res['score_input_tokens']} input + {res['score_output_tokens']} output tokens to score "
          f"({res['score_requests']} requests)")
    return 0


# -- SAE features, pair scores with baselines, head labels (issue 13) ---------------------------------------
def _feat(o, name: str) -> str:
    return f"explain/features/{o.sae}/{name}"


def _feature_stages():
    sae_in = lambda o: [f"sae/{o.sae}/cfg.json", f"sae/{o.sae}/sae_weights.safetensors",
                        f"sae/{o.sae}/dashboards/index.json"]
    return (
        Stage("explain.features", FeatureExplainOptions, "headscope.explain.features:run_explain_features",
              reads=sae_in, result=FeatureExplainResult,
              writes=lambda o: [_feat(o, "contexts.json"), _feat(o, f"explanations_{backend_name(o.backend)}.json")],
              doc="explanations of SAE features from max-activating and random held-out contexts",
              report="headscope.explain.reports:report_features"),
        Stage("explain.score-features", FeatureScoreOptions, "headscope.explain.features:run_score_features",
              result=FeatureScoresResult,
              reads=lambda o: [_feat(o, "contexts.json"), _feat(o, f"explanations_{o.explanations_name}.json")],
              writes=lambda o: [_feat(o, f"scores_{o.explanations_name}_by_{backend_name(o.backend)}.json")],
              doc="detection and fuzzing scores of feature explanations beside shuffled explanations",
              report="headscope.explain.reports:report_feature_scores"),
        Stage("explain.score-pairs", PairScoreOptions, "headscope.explain.pair_scores:run_score_pairs",
              result=PairScoresResult,
              reads=lambda o: [f"{_dir(o.which)}/explanations_{o.explanations or o.backend}.json",
                               f"{_neurons(o.which)}/attribution.json"],
              writes=lambda o: [f"{_dir(o.which)}/pair_scores_{o.explanations or o.backend}_by_{o.backend}.json"],
              doc="detection scores of (neuron, head) explanations beside shuffled explanations, with CIs",
              report="headscope.explain.reports:report_pair_scores"),
        Stage("explain.label", LabelOptions, "headscope.explain.head_label:run_labels", result=LabelsResult,
              writes=lambda o: ["explain/labels.json"],
              doc="a one-line label per head from what headscope measured (+ an LLM summary)",
              report="headscope.explain.reports:report_labels"),
    )


INSTRUMENT = Instrument(
    name="explain",
    help="explain and score when each head drives a neuron",
    stages=(
        Stage("explain.run", RunOptions, "headscope.explain.stages:run_explain", result=ExplainRunResult,
              reads=lambda o: [f"{_neurons(o.which)}/attribution.json"],
              writes=lambda o: [f"{_dir(o.which)}/explanations_{o.backend}.json"],
              doc="written explanations of when each head drives a neuron",
              report="headscope.explain.instrument:report_run"),
        Stage("explain.score", ScoreOptions, "headscope.explain.stages:run_score", result=ExplainScoreResult,
              reads=lambda o: [f"{_dir(o.which)}/explanations_{o.explanations or o.backend}.json"],
              writes=lambda o: [_score_file(o)],
              doc="explanation scores on held-out prompts", report="headscope.explain.instrument:report_score"),
        Stage("explain.baseline", BaselineOptions, "headscope.explain.stages:run_random_baseline",
              result=ComparisonResult,
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
        Command("explain.features-dry-run", FeatureDryRunOptions, "headscope.explain.features:cmd_features_dry_run",
                doc="write the feature-explanation requests to JSONL; send nothing"),
    ),
    atlas_data="headscope.explain.atlas_data:atlas_data",
)
