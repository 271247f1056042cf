"""Detection scores of (neuron, head) pair explanations beside the shuffled-explanation baseline
(``headscope explain score-pairs``).

The same scorer as for SAE features (:mod:`headscope.explain.scorers`): each pair's held-out prompts
(its neuron's *test* split, each ending with the neuron's token, as the pair explainer shows them) are
judged with the pair's own explanation and with another *neuron's* pair's explanation (a seeded
derangement across neurons, never a pair of the same neuron, whose explanation describes the same
prompts); the difference over pairs gets a CI clustered by neuron (pairs of one neuron share its prompts),
and each pair's own balanced accuracy an interval and p clustered by the documents of its prompts
(:func:`headscope.explain.scoring.detection_score`, as ``explain score`` does);
truth = the head is active on the prompt (the attribution's mask). Reported per pair and as means with
bootstrap CIs: balanced accuracy = the E = (TPR + TNR)/2 of ``explain score``, and AUROC when the
judge gives graded probabilities (local model logits, endpoint log-probabilities, the statistical rule).

Fuzzing does not apply to pairs: the unit is judged per prompt (is the head active when the model
predicts the neuron's token at the end), so no token inside the prompt is "the activating one" to mark.
File: ``explain/[random/]pair_scores_<explanations>_by_<judge>.json``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict

from tqdm import tqdm

from ..errors import HeadscopeError
from ..runs import RunDir, read_json, write_json
from .contexts import Context, JudgeRequest
from .options import PairScoreOptions
from .prompts import ClassifyRequest
from .results import PairScoresResult
from .scorers import score_units


def _pair_key(p: dict) -> str:
    return f"{p['neuron']}:{p['layer']}.{p['head']}"


def pair_units(run: RunDir, which: str, explanations: list[dict], max_per_class: int,
               min_per_class: int) -> list[dict]:
    """Scoring units of the explained pairs: a balanced sample of their held-out prompts (the same draw as
    `explain score`: :func:`headscope.explain.scoring.balanced_indices` seeded by the pair) as contexts (BOS
    dropped, the neuron's token appended), truth = head active. Pairs with too few prompts of a class are
    left out. Each unit carries its items' documents (``docs``: its own interval and p are clustered by
    them) and its neuron as the cluster of the summary's difference."""
    from ..neurons.stages import load_attribution, pair_labels
    from .scoring import balanced_indices
    from .stages import prompt_doc
    mined, att_json, att = load_attribution(run, which)
    n_heads = int(run.model_identity["n_heads"])
    by_key = {_pair_key(p): p for p in att_json["pairs"]}
    units = []
    for e in explanations:
        p = by_key.get(_pair_key(e))
        if p is None:
            continue
        nrn = mined["neurons"][p["neuron"]]
        labels, split = pair_labels(att, n_heads, p)
        prompts = nrn["train"] + nrn["test"]
        held = [(Context(list(pr["tokens"][1:]) + [nrn["token"]], [0.0] * len(pr["tokens"])), bool(lab))
                for pr, lab, s in zip(prompts, labels, split) if s == 1]
        docs = [prompt_doc(pr, j) for j, (pr, s) in enumerate(zip(prompts, split)) if s == 1]
        idx, why = balanced_indices([t for _, t in held], max_per_class, min_per_class, _pair_key(e))
        if why:
            continue
        items = [held[i] for i in idx]
        units.append({"id": f"{nrn['layer']}.{nrn['neuron']}:{p['name']}", "explanation": e["explanation"],
                      "items": {"detection": items}, "neuron": p["neuron"],
                      "docs": {"detection": [docs[i] for i in idx]}, "key": _pair_key(e),
                      "clusters": {"detection": [p["neuron"]] * len(items)}})
    return units


def run_score_pairs(model, run: RunDir, opts: PairScoreOptions, progress: bool = True,
                    backend=None) -> PairScoresResult:
    """Write ``pair_scores_<explanations>_by_<judge>.json`` (see the module docstring); returns the summary.
    ``backend``: a ready judge (tests) instead of ``opts.backend``."""
    from .stages import explain_dir, make_backend
    if backend is None:
        backend = make_backend(opts.backend, opts, run, model)
    d = explain_dir(run, opts.which)
    ex_name = opts.explanations or backend.name
    ex_path = d / f"explanations_{ex_name}.json"
    if not ex_path.is_file():
        raise HeadscopeError(f"missing {ex_path}: run `headscope explain run --backend {ex_name}` first")
    units = pair_units(run, opts.which, read_json(ex_path)["pairs"], opts.max_per_class, opts.min_per_class)
    if len({u["neuron"] for u in units}) < 2:
        raise HeadscopeError(f"the explained pairs in {ex_path} belong to {len({u['neuron'] for u in units})} "
                             "neuron(s): a shuffled baseline across neurons needs at least two")

    def judge(reqs: list[JudgeRequest]):
        return backend.classify_many([ClassifyRequest(r.explanation, r.context.text(mark=False), r.context.tokens[-1])
                                      for r in reqs])
    n = sum(2 * len(u["items"]["detection"]) for u in units)
    bar = tqdm(total=n, desc=f"scoring pairs ({backend.name})", unit=" judgement", disable=not progress,
               file=sys.stderr)
    res = score_units(judge, units, ("detection",), seed=opts.seed, progress=bar.update,
                      groups=[u["neuron"] for u in units], cluster_name="neuron")
    bar.close()
    probs = getattr(backend, "probabilities", None) or ("logits" if backend.name == "local" else "rule")
    out = {"scorer": backend.config(), "explanations": ex_name, "options": asdict(opts), "probabilities": probs,
           "fuzzing": "not applicable: pairs are judged per prompt, no token is the activating one",
           "pairs": res["units"], "summary": res["summary"]}
    write_json(d / f"pair_scores_{ex_name}_by_{backend.name}.json", out)
    return PairScoresResult(probabilities=probs, detection=res["summary"]["detection"])
