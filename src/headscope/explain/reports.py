"""One-paragraph CLI summaries of the feature, pair-score and label stages (``report=`` of their Stage)."""

from __future__ import annotations


def fmt_ci(m: dict | None) -> str:
    if not m or m.get("mean") is None:
        return "n/a"
    ci = m.get("ci")
    return f"{m['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _scorer_line(kind: str, k: dict, what: str) -> str:
    line = (f"{kind}: balanced accuracy {fmt_ci(k['balanced_accuracy'])} vs shuffled explanations "
            f"{fmt_ci(k['shuffled_balanced_accuracy'])} (difference {fmt_ci(k['difference'])}, one-sided "
            f"Wilcoxon p = {k['difference'].get('p_wilcoxon')}; {k['units']} {what}, {k['skipped']} skipped)")
    c = k.get("difference_clustered")
    if c and c.get("ci"):
        line += (f"; clustered by {c['by']} ({c['documents']}): {c['mean']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}],"
                 f" p = {c['p_bootstrap']:.3g}")
    if k.get("yes_rate"):
        line += "; judge says yes on " + ", ".join(f"{v['rate']:.2f} of {n}" for n, v in k["yes_rate"].items())
    if k.get("auroc"):
        line += f"; AUROC {fmt_ci(k['auroc'])} vs {fmt_ci(k['shuffled_auroc'])}"
    return line


def report_features(s, opts, run) -> None:
    """``s``: a :class:`~headscope.explain.results.FeatureExplainResult`."""
    fam = ", ".join(f"{k} {v}" for k, v in sorted((s.families or {}).items()))
    print(f"{s.features} features of SAE {s.sae} explained with the {s.backend} backend"
          + (f" ({s.skipped} drawn had no shown or no test context in disjoint documents)" if s.skipped else "")
          + (f"; families (DFA): {fam}" if fam else ""))


def report_feature_scores(s, opts, run) -> None:
    """``s``: a :class:`~headscope.explain.results.FeatureScoresResult`."""
    print(f"SAE {s.sae}: judgements read from {s.probabilities}")
    for kind in opts.scorers:
        print(_scorer_line(kind, getattr(s, kind), "features"))


def report_pair_scores(s, opts, run) -> None:
    """``s``: a :class:`~headscope.explain.results.PairScoresResult`."""
    print(f"{opts.which} pairs, judgements from {s.probabilities}")
    print(_scorer_line("detection", s.detection, "pairs"))


def report_labels(s, opts, run) -> None:
    """``s``: a :class:`~headscope.explain.results.LabelsResult`."""
    print(f"{s.heads} heads labelled ({s.summaries} written summaries) -> {s.path}")
