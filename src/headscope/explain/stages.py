"""Explain and score (steps 4–5), and the comparison with the random-neuron baseline.

Each (neuron, head) pair chosen by ``neurons attribute`` is explained from its neuron's *train*
prompts — the ones where the head was active and those where it was not (all of them, or up to ``max_examples`` of
each) — and scored on the neuron's *held-out* prompts: the scorer sees only the explanation and one
example and says whether the head is active on it; the truth is the attribution's active mask.
E = (TPR + TNR) / 2 on a *balanced* sample of held-out prompts, with a Wilson interval, a binomial test
against chance and BH over pairs (:mod:`headscope.explain.scoring`); pairs with too few prompts of a
class are not scored (E = None, with the reason). A shuffled-explanation control and the random-neuron
baseline show what E looks like when the explanation carries nothing; comparisons use the neuron as
the unit (pairs of one neuron share its prompts).

Backends share one interface (``explain_many``, ``classify_many``, ``config``, ``name``):
:class:`~headscope.explain.statistical.StatisticalExplainer`, :class:`~headscope.explain.openai_client.OpenAIExplainer`,
:class:`~headscope.explain.hf_local.LocalHFExplainer`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from ..errors import HeadscopeError
from ..neurons.stages import load_attribution, pair_labels, set_dir, source_hash
from ..neurons.stats import (bootstrap_diff_of_means, bootstrap_mean, describe, ks_2samp, mann_whitney,
                             wilcoxon_signed)
from ..runs import RunDir, read_json, write_json
from .prompts import ClassifyRequest, ExplainRequest, classify_messages, estimate_tokens, example_text, explain_messages
from .scoring import ScoringItem, add_fdr, balanced_accuracy, score_explanations, shuffled_items  # noqa: F401


def explain_dir(run: RunDir, which: str = "top") -> Path:
    """Folder of a neuron set's explanations and scores: ``explain/`` (top) or ``explain/random/``."""
    set_dir(run, which)  # checks the name
    return run / ("explain" if which == "top" else "explain/random")


def make_backend(name, run: RunDir | None = None, model=None, *, base_url: str = "https://api.openai.com/v1",
                 llm: str = "gpt-4o", api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4,
                 max_retries: int = 5, timeout: float = 60.0, backoff: float = 1.0, cache_dir: Path | None = None,
                 dry_run: Path | None = None, local_model: str = "default", device: str = "cpu",
                 max_terms: int = 5, window: int = 8):
    """Build an explainer backend by name: ``statistical``, ``openai`` or ``local`` (an object with
    ``explain_many``/``classify_many`` is returned as it is). ``local_model="default"`` reuses ``model``
    when that is the embedded default model."""
    if not isinstance(name, str):
        return name
    if name == "statistical":
        from .statistical import StatisticalExplainer
        return StatisticalExplainer(window=window, max_terms=max_terms)
    if name == "openai":
        from .openai_client import ChatClient, OpenAIExplainer, ResponseCache, api_key_from_env
        key = None if dry_run else api_key_from_env(base_url, api_key_env)
        if cache_dir is None and run is not None:
            cache_dir = run / "explain" / "cache"
        cache = ResponseCache(cache_dir) if cache_dir else None
        return OpenAIExplainer(ChatClient(base_url, llm, key, concurrency, max_retries, timeout, backoff,
                                          cache=cache, dry_run=dry_run))
    if name == "local":
        from .hf_local import LocalHFExplainer
        from ..models.load import DEFAULT_NAME
        if model is not None and local_model in ("default", DEFAULT_NAME) and model.name == DEFAULT_NAME:
            return LocalHFExplainer(model)
        return LocalHFExplainer(local_model, device=device)
    raise HeadscopeError(f"unknown explainer backend '{name}' (choose from statistical, openai, local)")


def _examples(mined_neuron: dict, labels: list[bool], split: list[int], which: int) -> tuple[list[str], list[bool]]:
    prompts = mined_neuron["train"] + mined_neuron["test"]
    xs, ys = [], []
    for p, lab, s in zip(prompts, labels, split):
        if s == which:
            xs.append(example_text(p["tokens"], mined_neuron["token"]))
            ys.append(lab)
    return xs, ys


def _pair_key(p: dict) -> str:
    return f"{p['neuron']}:{p['layer']}.{p['head']}"


def run_explain(model, run: RunDir, backend="statistical", which: str = "top", max_pairs: int | None = None,
                max_examples: int | None = None, backend_options: dict | None = None, chunk: int = 16, force: bool = False,
                progress: bool = True) -> dict:
    """Writes ``explain/[random/]explanations_<backend>.json``: ``{"backend": config, "source", "pairs": [{neuron,
    layer, head, name, neuron_layer, neuron_index, token, explanation, n_active, n_inactive}]}``,
    saved after every ``chunk`` pairs (a rerun resumes). With a dry-run OpenAI backend it writes the
    requests JSONL and returns token estimates instead."""
    backend = make_backend(backend, run, model, **(backend_options or {}))
    d = explain_dir(run, which)
    mined, att_json, att = load_attribution(run, which)
    n_heads = int(run.model_identity["n_heads"])
    pairs = att_json["pairs"][:max_pairs] if max_pairs else att_json["pairs"]
    if not pairs:
        raise HeadscopeError("no (neuron, head) pairs to explain: no head is active on 25–75% of any neuron's "
                             "train prompts; mine more prompts (--top-k) or more neurons")
    path = d / f"explanations_{backend.name}.json"
    src = source_hash(set_dir(run, which) / "attribution.json")
    old = read_json(path) if path.is_file() and not force else {}
    done = {_pair_key(p): p for p in old.get("pairs", [])} if old.get("source") == src and \
        old.get("backend") == backend.config() else {}
    reqs, todo = [], []
    for p in pairs:
        if _pair_key(p) in done:
            continue
        nrn = mined["neurons"][p["neuron"]]
        labels, split = pair_labels(att, n_heads, p)
        xs, ys = _examples(nrn, labels, split, 0)
        act = [x for x, y in zip(xs, ys) if y][:max_examples]
        ina = [x for x, y in zip(xs, ys) if not y][:max_examples]
        reqs.append(ExplainRequest(act, ina, nrn["token"]))
        todo.append((p, nrn, len(act), len(ina)))
    client = getattr(backend, "client", None)
    if client is not None and client.dry_run is not None:
        return _dry_run_estimate(reqs, mined, att, n_heads, pairs, client.dry_run, backend)
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
    return {"pairs": len(pairs), "new": len(todo)}


def _dry_run_estimate(reqs, mined, att, n_heads, pairs, jsonl: Path, backend) -> dict:
    """Write the explanation requests as JSONL and estimate tokens for explaining and scoring."""
    texts = backend.explain_many(reqs)  # the dry-run client appends each request and answers ""
    explain_in = sum(estimate_tokens(explain_messages(r)) for r in reqs)
    n_score, score_in = 0, 0
    placeholder = "x" * (4 * backend.max_tokens)  # an explanation of max_tokens tokens
    for p in pairs:
        labels, split = pair_labels(att, n_heads, p)
        xs, _ = _examples(mined["neurons"][p["neuron"]], labels, split, 1)
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
        xs, ys = _examples(mined["neurons"][p["neuron"]], labels, split, 1)
        items.append(ScoringItem(_pair_key(e), e["explanation"], xs, ys, mined["neurons"][p["neuron"]]["token"]))
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
        out.append(ScoringItem(it.key, items[int(rng.choice(others))].explanation, it.examples, it.truth, it.token)
                   if others else None)
    return out


def _baseline_E(pred: list[bool] | None, row: dict) -> float | None:
    """E of a baseline's held-out predictions on the balanced sample the explanation was scored on."""
    if pred is None or row.get("E") is None:
        return None
    return balanced_accuracy([pred[i] for i in row["examples"]], row["truth"])["E"]


def _by_unit(values: list, group: list[int]) -> list[float]:
    """Mean of the non-None values per unit (neuron), in unit order."""
    acc: dict[int, list[float]] = {}
    for v, g in zip(values, group):
        if v is not None:
            acc.setdefault(g, []).append(v)
    return [sum(v) / len(v) for _, v in sorted(acc.items())]


def run_score(model, run: RunDir, backend="statistical", which: str = "top", explanations: str | None = None,
              max_per_class: int = 20, min_per_class: int = 5, control: bool = True,
              backend_options: dict | None = None, progress: bool = True) -> dict:
    """Score each pair's explanation on a balanced sample of its neuron's held-out prompts
    (:mod:`headscope.explain.scoring`: m = min(#active, #inactive, ``max_per_class``) of each class, pairs
    with m < ``min_per_class`` not scored), with E's Wilson interval, a binomial p-value against chance
    and BH q-values over the pairs. ``control``: also score every pair with the explanation of a pair
    of another neuron (shuffled explanations: what E looks like when the explanation says nothing about
    this pair) — doubles the scorer's calls.

    Writes ``explain/[random/]scores_<backend>.json``: ``{"options", "scorer", "explanations", "source",
    "pairs": [{neuron, layer, head, name, neuron_layer, neuron_index, token, E, E_low, E_high, p, q,
    significant, lookup, TPR, TNR, n_pos, n_neg, unparsed, predictions, truth, examples, frac_test,
    E_control, E_same_head, E_norm, E_probe}], "summary": {pairs, scored, skipped, n, mean, std, skew (over
    pairs), by_neuron: {mean, low, high, n} (bootstrap 95 % over neurons, the independent unit),
    significant_bh, lookups, control: {by_neuron, vs_control}, same_head / norm / probe: {by_neuron,
    vs_explanation}}}`` (the Wilcoxon tests are over neurons: per neuron the mean of E − baseline over
    its pairs) and ``scores_<backend>.png``. Controls and baselines, all on the same balanced held-out
    sample as E: ``E_control`` another neuron's explanation (never the same neuron's); ``E_same_head`` the
    same head's explanation for another neuron; ``E_norm`` ‖z‖ alone and ``E_probe`` a probe on z (the
    ceiling), both fitted on the train prompts (:mod:`headscope.neurons.baselines`). A pair is a
    ``lookup`` only when E is above chance after BH and above ``E_norm``. ``explanations``: which backend's explanations to score
    (default: the scorer's own)."""
    backend = make_backend(backend, run, model, **(backend_options or {}))
    d = explain_dir(run, which)
    mined, att_json, att = load_attribution(run, which)
    n_heads = int(run.model_identity["n_heads"])
    ex_name = explanations or backend.name
    ex_path = d / f"explanations_{ex_name}.json"
    if not ex_path.is_file():
        raise HeadscopeError(f"missing {ex_path}: run `headscope explain run --backend {ex_name}` first")
    if not 1 <= min_per_class <= max_per_class:
        raise HeadscopeError(f"need 1 <= --min-per-class <= --max-per-class, got {min_per_class}, {max_per_class}")
    path = d / f"scores_{backend.name}.json" if ex_name == backend.name else d / f"scores_{ex_name}_by_{backend.name}.json"
    opts = {"max_per_class": max_per_class, "min_per_class": min_per_class, "control": control,
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
    write_json(path, {"options": opts, "scorer": backend.config(), "explanations": ex_name, "source": source_hash(ex_path),
                      "pairs": rows, "summary": summary})
    return summary


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


def run_compare(model, run: RunDir, scores: str = "statistical") -> dict:
    """Compare congruent and random neurons' explanation scores, one value per **neuron** (the mean E of
    its scored pairs: pairs of one neuron share their prompts, so they are not independent units).
    Writes ``explain/comparison_<scores>.json``: ``{"unit": "neuron", "top": {describe + mean/low/high},
    "random": {…}, "difference_of_means": {diff, low, high} (bootstrap 95 %), "mann_whitney": {U, p, auc}
    (two-sided, scipy's exact p for small samples), "ks": {D, p}, "power": {detectable, sd, …}
    (:func:`detectable_difference`: a difference smaller than ``detectable`` is not claimed)}`` and
    ``explain/comparison_<scores>.png``."""
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
    return res


def run_random_baseline(model, run: RunDir, backend="statistical", seed: int = 0, per_layer: int | None = None,
                        backend_options: dict | None = None, force: bool = False, progress: bool = True) -> dict:
    """The random-neuron baseline through the same pipeline: random neurons from the same layers (as
    many per layer unless ``per_layer``), mined, attributed, explained and scored with the options the
    congruent set used, then :func:`run_compare`; when the congruent set was ablated, the random set is
    ablated alike and compared (:func:`headscope.neurons.stages.compare_ablations`). Needs the congruent
    set's explain/score done first. Its ``mine`` reads the random neurons' top sequences from the top
    set's mining cache (:func:`headscope.neurons.stages.mine_cache_dir`: every neuron of the mined
    layers), so only the trimming runs the model."""
    from ..neurons import stages as ns
    from ..neurons.options import AblateOptions, AttributeOptions, FindOptions, MineOptions
    top = ns.set_dir(run, "top")
    f, m, a = (ns._need(top / n, s) for n, s in (("find.json", "find"), ("mine.json", "mine"),
                                                  ("attribution.json", "attribute")))
    fo, mo, ao = f["options"], m["options"], a["options"]
    ns.run_find(model, run, FindOptions(which="random", layers=",".join(map(str, fo["layers"])),
                                        per_layer=per_layer or fo["per_layer"], kind=fo["kind"],
                                        unembed=fo.get("unembed", "centred"), seed=seed))
    ns.run_mine(model, run, MineOptions(which="random", corpus=mo["corpus"], seq_len=mo["seq_len"], top_k=mo["top_k"],
                                        top_k_test=mo["top_k_test"], keep=mo["keep"],
                                        max_prompt_tokens=mo["max_prompt_tokens"],
                                        trim_tolerance=mo.get("trim_tolerance", 0.0), max_tokens=mo["max_tokens"]),
                progress=progress)
    ns.run_attribute(model, run, AttributeOptions(which="random", gated=ao["gated"], norm_scale=ao["norm_scale"],
                                                  k_sigma=ao["k_sigma"], low=ao["low"], high=ao["high"]),
                     progress=progress)
    be = make_backend(backend, run, model, **(backend_options or {}))
    sp = explain_dir(run, "top") / f"scores_{be.name}.json"
    so = read_json(sp).get("options", {}) if sp.is_file() else {}
    run_explain(model, run, be, "random", force=force, progress=progress)
    run_score(model, run, be, "random", max_per_class=so.get("max_per_class", 20),
              min_per_class=so.get("min_per_class", 5), control=so.get("control", True), progress=progress)
    res = run_compare(model, run, be.name)
    top_abl = top / "ablation.json"
    if top_abl.is_file():  # the causal check on the random neurons too, with the congruent set's options
        ab = read_json(top_abl)["options"]
        res["ablation_vs_random"] = ns.run_ablate(
            model, run, AblateOptions(which="random", max_pairs=ab["max_pairs"], mode=ab["mode"]),
            progress=progress).get("vs_random")
    return res
