"""Explain and score (steps 4–5), and the comparison with the random-neuron baseline.

Each (neuron, head) pair chosen by ``neurons attribute`` is explained from its neuron's *train*
prompts — the ones where the head was active and those where it was not (all of them, or up to ``max_examples`` of
each) — and scored on the neuron's *held-out* prompts: the scorer sees only the explanation and one
example and says whether the head is active on it; the truth is the attribution's active mask.
E = (TPR + TNR) / 2 on a *balanced* sample of held-out prompts, with an interval and a p-value against chance
clustered by the prompts' documents (a neuron's prompts come from a few documents: design-effect Wilson
interval and sign-flip test over documents, :mod:`headscope.explain.scoring`) and BH over pairs; pairs with too few
prompts of a class are not scored (E = None, with the reason). A shuffled-explanation control and the random-neuron
baseline show what E looks like when the explanation carries nothing; comparisons use the neuron as
the unit (pairs of one neuron share its prompts). Every step takes its options dataclass
(:mod:`headscope.explain.options`) and returns its typed result (:mod:`headscope.explain.results`).

Backends share one interface (``explain_many``, ``classify_many``, ``config``, ``name``):
:class:`~headscope.explain.statistical.StatisticalExplainer`, :class:`~headscope.explain.openai_client.OpenAIExplainer`,
:class:`~headscope.explain.hf_local.LocalHFExplainer`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from tqdm import tqdm

from ..errors import HeadscopeError
from ..neurons.stages import load_attribution, pair_labels, set_dir, source_hash
from ..neurons.stats import (bootstrap_diff_of_means, bootstrap_mean, describe, ks_2samp, mann_whitney,
                             wilcoxon_signed)
from ..runs import RunDir, read_json, write_json
from .options import (BackendOptions, BaselineOptions, CompareOptions, DryRunOptions, LLMOptions, RunOptions,
                      ScoreOptions)
from .prompts import ClassifyRequest, ExplainRequest, classify_messages, estimate_tokens, example_text, explain_messages
from .results import ComparisonResult, ExplainRunResult, ExplainScoreResult
from .scoring import ScoringItem, add_fdr, balanced_accuracy, score_explanations, shuffled_items


def explain_dir(run: RunDir, which: str = "top") -> Path:
    """Folder of a neuron set's explanations and scores: ``explain/`` (top) or ``explain/random/``."""
    set_dir(run, which)  # checks the name
    return run / ("explain" if which == "top" else "explain/random")


def make_backend(name, opts: LLMOptions, run: RunDir | None = None, model=None, dry_run: Path | None = None):
    """Build an explainer backend by name (``statistical``, ``openai`` or ``local``) with the settings of
    ``opts`` (the one declaration of the back-end options: :class:`~headscope.explain.options.LLMOptions`,
    with the statistical explainer's ``max_terms``/``window`` when ``opts`` is a
    :class:`~headscope.explain.options.BackendOptions`); an object with ``explain_many``/``classify_many`` is
    returned as it is. ``dry_run``: a JSONL path the OpenAI client writes its requests to instead of sending
    them. The local back-end runs on ``model``'s device and reuses ``model`` when ``opts.explainer_model``
    names the embedded default model and ``model`` is it; the OpenAI response cache is ``opts.cache_dir``
    or RUN/explain/cache."""
    if not isinstance(name, str):
        return name
    if name == "statistical":
        from .statistical import StatisticalExplainer
        if isinstance(opts, BackendOptions):
            return StatisticalExplainer(window=opts.window, max_terms=opts.max_terms)
        return StatisticalExplainer()
    if name == "openai":
        from .openai_client import ChatClient, OpenAIExplainer, ResponseCache, api_key_from_env
        key = None if dry_run else api_key_from_env(opts.base_url, opts.api_key_env)
        cache_dir = Path(opts.cache_dir) if opts.cache_dir else run / "explain" / "cache" if run is not None else None
        cache = ResponseCache(cache_dir) if cache_dir else None
        return OpenAIExplainer(ChatClient(opts.base_url, opts.llm, key, opts.concurrency, opts.max_retries,
                                          opts.timeout, opts.backoff, cache=cache, dry_run=dry_run))
    if name == "local":
        from .hf_local import LocalHFExplainer
        from ..models.load import DEFAULT_NAME
        if model is not None and opts.explainer_model in ("default", DEFAULT_NAME) and model.name == DEFAULT_NAME:
            return LocalHFExplainer(model)
        return LocalHFExplainer(opts.explainer_model, device=str(getattr(model, "device", "cpu")))
    raise HeadscopeError(f"unknown explainer backend '{name}' (choose from statistical, openai, local)")


def prompt_doc(prompt: dict, index: int):
    """The document a mined prompt comes from (``prompt["doc"]``, :mod:`headscope.neurons.mining`); a prompt
    mined before documents were recorded counts as its own document (``"prompt<index>"``)."""
    d = prompt.get("doc")
    return f"prompt{index}" if d is None else d


def split_examples(mined_neuron: dict, labels: list[bool], split: list[int], which: int
              ) -> tuple[list[str], list[bool], list]:
    """The texts, labels (head active) and documents of a neuron's prompts of split ``which`` (0 train,
    1 held out)."""
    prompts = mined_neuron["train"] + mined_neuron["test"]
    xs, ys, ds = [], [], []
    for j, (p, lab, s) in enumerate(zip(prompts, labels, split)):
        if s == which:
            xs.append(example_text(p["tokens"], mined_neuron["token"]))
            ys.append(lab)
            ds.append(prompt_doc(p, j))
    return xs, ys, ds


def _pair_key(p: dict) -> str:
    return f"{p['neuron']}:{p['layer']}.{p['head']}"


def _explain_requests(run: RunDir, opts: RunOptions | DryRunOptions):
    """The attribution's pairs (at most ``opts.max_pairs``) and an :class:`ExplainRequest` for each: its
    neuron's train prompts where the head is active and where it is not (at most ``opts.max_examples``
    each). Returns ``(mined, att, n_heads, pairs, reqs, todo)``; ``todo[i]`` = ``(pair, neuron, n_active,
    n_inactive)`` of ``reqs[i]``."""
    mined, att_json, att = load_attribution(run, opts.which)
    n_heads = int(run.model_identity["n_heads"])
    pairs = att_json["pairs"][:opts.max_pairs] if opts.max_pairs else att_json["pairs"]
    if not pairs:
        raise HeadscopeError("no (neuron, head) pairs to explain: no head is active on 25–75% of any neuron's "
                             "train prompts; mine more prompts (--top-k) or more neurons")
    reqs, todo = [], []
    for p in pairs:
        nrn = mined["neurons"][p["neuron"]]
        labels, split = pair_labels(att, n_heads, p)
        xs, ys, _ = split_examples(nrn, labels, split, 0)
        act = [x for x, y in zip(xs, ys) if y][:opts.max_examples]
        ina = [x for x, y in zip(xs, ys) if not y][:opts.max_examples]
        reqs.append(ExplainRequest(act, ina, nrn["token"]))
        todo.append((p, nrn, len(act), len(ina)))
    return mined, att, n_heads, pairs, reqs, todo


def run_explain(model, run: RunDir, opts: RunOptions, progress: bool = True, backend=None, resume: bool = False,
                chunk: int = 16) -> ExplainRunResult:
    """Writes ``explain/[random/]explanations_<backend>.json``: ``{"backend": config, "source", "pairs": [{neuron,
    layer, head, name, neuron_layer, neuron_index, token, explanation, n_active, n_inactive}]}``,
    saved after every ``chunk`` pairs. ``resume``: keep the pairs an earlier, interrupted call of the same
    back-end on the same attribution saved, and explain only the others (the stage explains every pair
    afresh; an endpoint's response cache still answers identical requests without a call). ``backend``:
    a ready back-end object instead of ``opts.backend`` (tests, the random-neuron baseline)."""
    backend = make_backend(backend or opts.backend, opts, run, model)
    d = explain_dir(run, opts.which)
    _, _, _, pairs, reqs, todo = _explain_requests(run, opts)
    path = d / f"explanations_{backend.name}.json"
    src = source_hash(set_dir(run, opts.which) / "attribution.json")
    old = read_json(path) if path.is_file() and resume else {}
    done = {_pair_key(p): p for p in old.get("pairs", [])} if old.get("source") == src and \
        old.get("backend") == backend.config() else {}
    keep = [i for i, t in enumerate(todo) if _pair_key(t[0]) not in done]
    reqs, todo = [reqs[i] for i in keep], [todo[i] for i in keep]
    bar = tqdm(total=len(pairs), initial=len(pairs) - len(todo), desc=f"explaining ({backend.name})",
               unit=" pair", disable=not progress, file=sys.stderr)
    for s in range(0, len(todo), chunk):
        texts = backend.explain_many(reqs[s:s + chunk])
        for (p, nrn, na, ni), text in zip(todo[s:s + chunk], texts):
            done[_pair_key(p)] = {"neuron": p["neuron"], "layer": p["layer"], "head": p["head"], "name": p["name"],
                                  "neuron_layer": nrn["layer"], "neuron_index": nrn["neuron"], "token": nrn["token"],
                                  "explanation": text, "n_active": na, "n_inactive": ni}
        write_json(path, {"backend": backend.config(), "source": src,
                          "pairs": [done[_pair_key(p)] for p in pairs if _pair_key(p) in done]})
        bar.update(len(texts))
    bar.close()
    if not todo:
        write_json(path, {"backend": backend.config(), "source": src, "pairs": [done[_pair_key(p)] for p in pairs]})
    return ExplainRunResult(pairs=len(pairs), new=len(todo), backend=backend.name)


def dry_run_estimate(model, run: RunDir, opts: DryRunOptions) -> dict:
    """Write the explanation requests an OpenAI-compatible endpoint would get to ``opts.jsonl`` (sending
    nothing) and estimate tokens for explaining and scoring: ``{dry_run, explain_requests,
    explain_input_tokens, explain_output_tokens_max, score_requests, score_input_tokens,
    score_output_tokens}``."""
    jsonl = Path(opts.jsonl)
    if jsonl.exists():
        jsonl.unlink()
    backend = make_backend("openai", opts, run, model, dry_run=jsonl)
    mined, att, n_heads, pairs, reqs, _ = _explain_requests(run, opts)
    texts = backend.explain_many(reqs)  # the dry-run client appends each request and answers ""
    explain_in = sum(estimate_tokens(explain_messages(r)) for r in reqs)
    n_score, score_in = 0, 0
    placeholder = "x" * (4 * backend.max_tokens)  # an explanation of max_tokens tokens
    for p in pairs:
        labels, split = pair_labels(att, n_heads, p)
        xs, _, _ = split_examples(mined["neurons"][p["neuron"]], labels, split, 1)
        for x in xs:
            n_score += 1
            score_in += estimate_tokens(classify_messages(ClassifyRequest(placeholder, x)))
    return {"dry_run": str(jsonl), "explain_requests": len(texts), "explain_input_tokens": explain_in,
            "explain_output_tokens_max": len(texts) * backend.max_tokens, "score_requests": n_score,
            "score_input_tokens": score_in, "score_output_tokens": n_score}


def _pair_items(ex: dict, att_json: dict, mined: dict, att, n_heads: int
                ) -> tuple[list[ScoringItem], list[dict], list[int], list[dict]]:
    """The scoring items (explanation + the pair's held-out examples and truth), their explanation rows,
    each item's neuron (the independent unit) and its attribution pair (baselines, held-out rate)."""
    pairs_by_key = {_pair_key(p): p for p in att_json["pairs"]}
    items, rows, group, pairs = [], [], [], []
    for e in ex["pairs"]:
        p = pairs_by_key.get(_pair_key(e))
        if p is None:
            continue
        labels, split = pair_labels(att, n_heads, p)
        xs, ys, ds = split_examples(mined["neurons"][p["neuron"]], labels, split, 1)
        items.append(ScoringItem(_pair_key(e), e["explanation"], xs, ys, mined["neurons"][p["neuron"]]["token"], ds))
        rows.append(e)
        group.append(p["neuron"])
        pairs.append(p)
    return items, rows, group, pairs


def same_head_items(items: list[ScoringItem], group: list[int], heads: list[str], seed: int = 0
                    ) -> list[ScoringItem | None]:
    """The same-head / other-neuron control: each item scored with the explanation of the *same head*
    for another neuron (chosen at random, seeded); None where no other neuron has a pair with that head.
    It asks whether the explanation is about this look-up or about what the head does anyway."""
    import numpy as np
    rng = np.random.default_rng(seed)
    out = []
    for i, it in enumerate(items):
        others = [j for j in range(len(items)) if heads[j] == heads[i] and group[j] != group[i]]
        out.append(dataclasses.replace(it, explanation=items[int(rng.choice(others))].explanation)
                   if others else None)
    return out


def _baseline_E(pred: list[bool] | None, row: dict) -> float | None:
    """E of a baseline's held-out predictions on the balanced sample the explanation was scored on."""
    if pred is None or row.get("E") is None:
        return None
    return balanced_accuracy([pred[i] for i in row["examples"]], row["truth"])


def _by_unit(values: list, group: list[int]) -> list[float]:
    """Mean of the non-None values per unit (neuron), in unit order."""
    acc: dict[int, list[float]] = {}
    for v, g in zip(values, group):
        if v is not None:
            acc.setdefault(g, []).append(v)
    return [sum(v) / len(v) for _, v in sorted(acc.items())]


def run_score(model, run: RunDir, opts: ScoreOptions, progress: bool = True, backend=None) -> ExplainScoreResult:
    """Score each pair's explanation on a balanced sample of its neuron's held-out prompts
    (:mod:`headscope.explain.scoring`: m = min(#active, #inactive, ``max_per_class``) of each class, pairs
    with m < ``min_per_class`` not scored), with E's 95 % interval and one-sided p-value against chance
    clustered by the prompts' documents (design-effect Wilson and sign-flip test over documents; Wilson and
    the exact binomial test when every prompt is its own document), and BH q-values over the pairs of
    those p-values. ``control``: also score every pair with the explanation of a pair
    of another neuron (shuffled explanations: what E looks like when the explanation says nothing about
    this pair) — doubles the scorer's calls.

    Writes ``explain/[random/]scores_<backend>.json``: ``{"options", "scorer", "explanations", "source",
    "pairs": [{neuron, layer, head, name, neuron_layer, neuron_index, token, E, E_low, E_high, p, q,
    documents, interval, icc, design_effect (clustered rows), significant, lookup, TPR, TNR, n_pos, n_neg, unparsed,
    predictions, truth, examples, frac_test,
    E_control, E_same_head, E_norm, E_probe}], "summary": {pairs, scored, skipped, n, mean, std, skew (over
    pairs), by_neuron: {mean, low, high, n} (bootstrap 95 % over neurons, the independent unit),
    significant_bh, lookups, control: {by_neuron, vs_control}, same_head / norm / probe: {by_neuron,
    vs_explanation}}}`` (the Wilcoxon tests are over neurons: per neuron the mean of E − baseline over
    its pairs) and ``scores_<backend>.png``. Controls and baselines, all on the same balanced held-out
    sample as E: ``E_control`` another neuron's explanation (never the same neuron's); ``E_same_head`` the
    same head's explanation for another neuron; ``E_norm`` ‖z‖ alone and ``E_probe`` a probe on z (the
    ceiling), both fitted on the train prompts (:mod:`headscope.neurons.baselines`). A pair is a
    ``lookup`` only when E is above chance after BH and above ``E_norm``. ``opts.explanations``: which
    backend's explanations to score (default: the scorer's own). ``backend``: a ready scorer object
    instead of ``opts.backend``."""
    backend = make_backend(backend or opts.backend, opts, run, model)
    which, max_per_class, min_per_class, control = opts.which, opts.max_per_class, opts.min_per_class, opts.control
    d = explain_dir(run, which)
    mined, att_json, att = load_attribution(run, which)
    n_heads = int(run.model_identity["n_heads"])
    ex_name = opts.explanations or backend.name
    ex_path = d / f"explanations_{ex_name}.json"
    if not ex_path.is_file():
        raise HeadscopeError(f"missing {ex_path}: run `headscope explain run --backend {ex_name}` first")
    path = d / f"scores_{backend.name}.json" if ex_name == backend.name else d / f"scores_{ex_name}_by_{backend.name}.json"
    file_opts = {"max_per_class": max_per_class, "min_per_class": min_per_class, "control": control,
                 "scorer": backend.config()}
    ex = read_json(ex_path)
    items, erows, group, apairs = _pair_items(ex, att_json, mined, att, n_heads)
    n_ex = sum(2 * min(sum(it.truth), len(it.truth) - sum(it.truth), max_per_class) for it in items) * (3 if control else 1)
    bar = tqdm(total=n_ex, desc=f"scoring ({backend.name})", unit=" example", disable=not progress, file=sys.stderr)
    scored = score_explanations(backend, items, max_per_class, min_per_class, progress=bar.update)
    ctrl = score_explanations(backend, shuffled_items(items, group), max_per_class, min_per_class,
                              progress=bar.update) if control else None
    same = None
    if control:
        sh = same_head_items(items, group, [p["name"] for p in apairs])
        got = iter(score_explanations(backend, [x for x in sh if x is not None], max_per_class, min_per_class,
                                      progress=bar.update))
        same = [next(got) if x is not None else None for x in sh]
    bar.close()
    rows = []
    for j, (e, r) in enumerate(zip(erows, scored)):
        r = {k: v for k, v in r.items() if k != "key"}
        if ctrl is not None:
            r["E_control"] = ctrl[j]["E"]
            r["E_same_head"] = same[j]["E"] if same[j] is not None else None
        base = apairs[j].get("baseline_pred") or {}
        r["E_norm"] = _baseline_E(base.get("norm"), r)
        r["E_probe"] = _baseline_E(base.get("probe"), r)
        r["frac_test"] = apairs[j].get("frac_test")
        rows.append({**{k: e[k] for k in ("neuron", "layer", "head", "name", "neuron_layer", "neuron_index", "token")}, **r})
    n_sig = add_fdr(rows)
    for r in rows:   # a look-up: above chance (BH) and above what ‖z‖ alone tells
        r["lookup"] = bool(r["significant"] and r["E_norm"] is not None and r["E"] > r["E_norm"])
    Es = [r["E"] for r in rows if r["E"] is not None]
    summary = {"pairs": len(rows), "scored": len(Es), "skipped": len(rows) - len(Es), **describe(Es),
               "by_neuron": bootstrap_mean(_by_unit([r["E"] for r in rows], group)), "significant_bh": n_sig,
               "lookups": sum(r["lookup"] for r in rows), "unit": "neuron"}
    for key, name in (("E_control", "control"), ("E_same_head", "same_head"), ("E_norm", "norm"),
                      ("E_probe", "probe")):
        if not any(r.get(key) is not None for r in rows):
            continue
        sel = [(r, g) for r, g in zip(rows, group) if r["E"] is not None and r.get(key) is not None]
        diffs = _by_unit([r["E"] - r[key] for r, _ in sel], [g for _, g in sel])
        summary[name] = {"by_neuron": bootstrap_mean(_by_unit([r[key] for r, _ in sel], [g for _, g in sel])),
                         "vs_control" if name == "control" else "vs_explanation": wilcoxon_signed(diffs),
                         "neurons": len(diffs)}
    from ..neurons.plots import histogram_png
    hist = {f"{which} neurons": Es}
    if ctrl is not None:
        hist["shuffled explanations"] = [r["E_control"] for r in rows if r.get("E_control") is not None]
    histogram_png(path.with_suffix(".png"), hist, f"Explanation scores E ({ex_name})", "E = (TPR+TNR)/2")
    write_json(path, {"options": file_opts, "scorer": backend.config(), "explanations": ex_name,
                      "source": source_hash(ex_path), "pairs": rows, "summary": summary})
    return ExplainScoreResult(**summary)


def _neuron_E(path) -> list[float]:
    """Per-neuron mean E of a scores file (the unit of the comparison)."""
    rows = read_json(path)["pairs"]
    return _by_unit([r["E"] for r in rows], [r["neuron"] for r in rows])


def detectable_difference(a: list[float], b: list[float], alpha: float = 0.05, power: float = 0.8) -> dict:
    """The smallest difference of per-neuron means the comparison detects with ``power`` (two-sided
    ``alpha``, normal approximation with the pooled SD): (z_{1−α/2} + z_power) · s · √(1/n_a + 1/n_b).
    A difference below it is not claimed either way; ``neurons_per_set_for_0.03``: the set size needed
    to detect 0.03 at this SD."""
    import numpy as np
    from scipy.stats import norm
    if len(a) < 2 or len(b) < 2:
        return {"detectable": None, "sd": None, "n": [len(a), len(b)]}
    sd = float(np.sqrt(((len(a) - 1) * np.var(a, ddof=1) + (len(b) - 1) * np.var(b, ddof=1)) / (len(a) + len(b) - 2)))
    k = float(norm.ppf(1 - alpha / 2) + norm.ppf(power))
    return {"detectable": k * sd * float(np.sqrt(1 / len(a) + 1 / len(b))), "sd": sd, "n": [len(a), len(b)],
            "alpha": alpha, "power": power, "neurons_per_set_for_0.03": int(np.ceil(2 * (k * sd / 0.03) ** 2))}


def run_compare(run: RunDir, opts: CompareOptions) -> ComparisonResult:
    """Compare congruent and random neurons' explanation scores, one value per **neuron** (the mean E of
    its scored pairs: pairs of one neuron share their prompts, so they are not independent units).
    Writes ``explain/comparison_<scores>.json``: ``{"unit": "neuron", "top": {describe + mean/low/high},
    "random": {…}, "difference_of_means": {diff, low, high} (bootstrap 95 %), "mann_whitney": {U, p, auc}
    (two-sided, scipy's exact p for small samples), "ks": {D, p}, "power": {detectable, sd, …}
    (:func:`detectable_difference`: a difference smaller than ``detectable`` is not claimed)}`` and
    ``explain/comparison_<scores>.png``."""
    scores = opts.scores
    Es = {}
    for which in ("top", "random"):
        path = explain_dir(run, which) / f"scores_{scores}.json"
        if not path.is_file():
            raise HeadscopeError(f"missing {path}: run the {which} neuron set through explain/score first "
                                 f"(`--set {which}`)")
        Es[which] = _neuron_E(path)
    res = {"scores": scores, "unit": "neuron",
           "top": {**describe(Es["top"]), **bootstrap_mean(Es["top"])},
           "random": {**describe(Es["random"]), **bootstrap_mean(Es["random"])},
           "difference_of_means": bootstrap_diff_of_means(Es["top"], Es["random"]),
           "mann_whitney": mann_whitney(Es["top"], Es["random"]), "ks": ks_2samp(Es["top"], Es["random"]),
           "power": detectable_difference(Es["top"], Es["random"])}
    from ..neurons.plots import histogram_png
    histogram_png(run / f"explain/comparison_{scores}.png", {"congruent neurons": Es["top"], "random neurons": Es["random"]},
                  f"Per-neuron mean E, congruent vs random neurons ({scores})", "E = (TPR+TNR)/2")
    write_json(run / f"explain/comparison_{scores}.json", res)
    return ComparisonResult(**res)


def run_random_baseline(model, run: RunDir, opts: BaselineOptions, progress: bool = True,
                        backend=None) -> ComparisonResult:
    """The random-neuron baseline through the same pipeline: random neurons from the same layers (as
    many per layer unless ``opts.per_layer``), mined, attributed, explained and scored with the options the
    congruent set used, then :func:`run_compare`; when the congruent set was ablated, the random set is
    ablated alike and compared (:func:`headscope.neurons.stages.compare_ablations`). Needs the congruent
    set's explain/score done first. Its ``mine`` reads the random neurons' top sequences from the top
    set's mining cache (:func:`headscope.neurons.stages.mine_cache_dir`: every neuron of the mined
    layers), so only the trimming runs the model. ``backend``: a ready back-end object instead of
    ``opts.backend``."""
    from ..neurons import stages as ns
    from ..neurons.options import AblateOptions, AttributeOptions, FindOptions, MineOptions
    top = ns.set_dir(run, "top")
    f, m, a = (ns._need(top / n, s) for n, s in (("find.json", "find"), ("mine.json", "mine"),
                                                  ("attribution.json", "attribute")))
    fo, mo, ao = f["options"], m["options"], a["options"]
    ns.run_find(model, run, FindOptions(which="random", layers=",".join(map(str, fo["layers"])),
                                        per_layer=opts.per_layer or fo["per_layer"], kind=fo["kind"],
                                        seed=opts.seed, **{k: fo[k] for k in ("unembed", "require_space", "min_chars")
                                                           if k in fo}),
                reject=fo.get("reject"))                    # filtered exactly like the top set
    ns.run_mine(model, run, MineOptions(which="random", corpus=mo["corpus"], seq_len=mo["seq_len"], top_k=mo["top_k"],
                                        top_k_test=mo["top_k_test"], keep=mo["keep"],
                                        max_prompt_tokens=mo["max_prompt_tokens"],
                                        trim_tolerance=mo.get("trim_tolerance", 0.0), max_tokens=mo["max_tokens"]),
                progress=progress)
    ns.run_attribute(model, run, AttributeOptions(which="random", gated=ao["gated"], norm_scale=ao["norm_scale"],
                                                  k_sigma=ao["k_sigma"], low=ao["low"], high=ao["high"]),
                     progress=progress)
    be = make_backend(backend or opts.backend, opts, run, model)
    sp = explain_dir(run, "top") / f"scores_{be.name}.json"
    so = read_json(sp).get("options", {}) if sp.is_file() else {}
    shared = {f.name: getattr(opts, f.name) for f in dataclasses.fields(BackendOptions)}
    run_explain(model, run, RunOptions(**shared, which="random"), progress=progress, backend=be)
    score_opts = {k: so[k] for k in ("max_per_class", "min_per_class", "control") if k in so}
    run_score(model, run, ScoreOptions(**shared, which="random", **score_opts), progress=progress, backend=be)
    res = run_compare(run, CompareOptions(scores=be.name))
    top_abl = top / "ablation.json"
    if top_abl.is_file():  # the causal check on the random neurons too, with the congruent set's options
        ab = read_json(top_abl)["options"]
        abl = ns.run_ablate(model, run, AblateOptions(which="random", max_pairs=ab["max_pairs"], mode=ab["mode"]),
                            progress=progress)
        res = dataclasses.replace(res, ablation_vs_random=_get(abl, "vs_random"))
    return res


def _get(summary, key: str):
    """``key`` of a summary, whether a ``run_*`` dict (``neurons.stages.run_ablate``) or a typed result."""
    from ..results import Result
    if isinstance(summary, Result):
        summary = summary.to_json()
    return summary.get(key)
