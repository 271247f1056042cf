"""The neuron pipeline's stages, one function each, reading and writing the run directory.

Each ``run_*`` function is idempotent: it returns the stage's summary at once when its artifact is
already there and was made from the current upstream artifact (the SHA-1 of the upstream file is
recorded as ``"source"``), otherwise it (re)computes. ``which`` selects the neuron set:
``"top"`` (congruent neurons, folder ``neurons/``) or ``"random"`` (the random-neuron baseline,
folder ``neurons/random/``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ..data import TokenCorpus
from ..errors import HeadscopeError
from ..models.load import Model
from ..runs import RunDir, file_hash, read_json, read_tensors, write_json, write_tensors
from ..sites import parse_layers
from . import ablation, attribution, baselines, congruence, mining
from .options import AblateOptions, AttributeOptions, FindOptions, MineOptions
from .stats import bh, bootstrap_diff_of_means, bootstrap_mean, describe, mann_whitney, wilcoxon_signed

SETS = ("top", "random")


def set_dir(run: RunDir, which: str = "top") -> Path:
    """Folder of a neuron set in the run directory."""
    if which not in SETS:
        raise HeadscopeError(f"unknown neuron set '{which}' (choose from {', '.join(SETS)})")
    return run / ("neurons" if which == "top" else "neurons/random")


def source_hash(path: Path) -> str:
    """The ``source`` a neuron/explain artifact records of the file it was made from: the first 16 hex
    digits of :func:`headscope.runs.file_hash` (sha1 of the bytes)."""
    return file_hash(path)[:16]


def _need(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise HeadscopeError(f"missing {path}: run `headscope neurons {stage}` first")
    return read_json(path)


# -- find ---------------------------------------------------------------------------------------
def run_find(model: Model, run: RunDir, opts: FindOptions, progress: bool = True,
             reject: list[str] | None = None) -> dict:
    """The ``neurons.find`` stage. Writes ``<set>/find.json``: ``{"options", "neurons": [{layer, neuron,
    token_id, token, dot, cos, kurtosis, skew, rank, top_tokens}], "per_layer": {layer: {candidates,
    passed}}}``. ``opts.unembed``: ``"centred"`` (default, TransformerLens' ``center_unembed``) or ``"raw"``
    W_U, see :mod:`headscope.neurons.congruence`. Both sets pass the same token filters; ``reject``: the
    rejected tokens themselves (the random baseline passes the top set's recorded list), else
    ``opts.reject_file`` or the built-in list."""
    which, last_k, per_layer, rank_by, kind = opts.which, opts.last_k, opts.per_layer, opts.rank_by, opts.kind
    require_space, min_chars, seed, unembed = opts.require_space, opts.min_chars, opts.seed, opts.unembed
    layers = parse_layers(opts.layers, model.n_layers) if opts.layers else \
        list(range(max(0, model.n_layers - last_k), model.n_layers))
    if reject is None and opts.reject_file:
        p = Path(opts.reject_file)
        if not p.is_file():
            raise HeadscopeError(f"reject file not found: {p}")
        reject = [line.rstrip("\n") for line in p.read_text().splitlines() if line.strip()]
    recorded = {"layers": layers, "per_layer": per_layer, "rank_by": rank_by, "kind": kind,
                "require_space": require_space, "min_chars": min_chars,
                "reject": list(congruence.DEFAULT_REJECT if reject is None else reject), "seed": seed,
                "unembed": unembed}
    path = set_dir(run, which) / "find.json"
    if which == "top":
        res = congruence.find_neurons(model, layers, per_layer, rank_by, kind, require_space, min_chars,
                                      recorded["reject"], unembed=unembed)
    else:
        res = congruence.random_neurons(model, layers, per_layer, seed, kind, unembed, require_space, min_chars,
                                        recorded["reject"])
    write_json(path, {"options": recorded, **res})
    return {"neurons": len(res["neurons"]), "per_layer": res["per_layer"]}


# -- mine ---------------------------------------------------------------------------------------
def mine_cache_dir(run: RunDir) -> Path:
    """Where ``mine`` keeps the running top-k of every neuron of the mined layers
    (``top_<key>.safetensors``, key = the corpus (its cache key: text, tokenizer, split fraction), split, seq_len, max_tokens, k, layers): both neuron sets
    read their top sequences from it, so the random set's mining runs no corpus pass. A file whose
    ``next`` is below the split's sequence count is an interrupted pass, resumed by the next run."""
    return run / "neurons" / "mine_cache"


def run_mine(model: Model, run: RunDir, opts: MineOptions, progress: bool = True) -> dict:
    """The ``neurons.mine`` stage. Writes ``<set>/mine.json``: ``{"options", "source", "neurons": [{layer,
    neuron, token_id, token, "train": [prompt], "test": [prompt]}], "documents_scanned": {split: n}}``,
    prompt = ``{ids, tokens, acts (per token), act, full_act, seq, pos, start, doc}`` (``doc``: the document
    of the activating token)."""
    which, corpus, seq_len, top_k, top_k_test = opts.which, opts.corpus, opts.seq_len, opts.top_k, opts.top_k_test
    keep, max_prompt_tokens, trim_tolerance = opts.keep, opts.max_prompt_tokens, opts.trim_tolerance
    batch_size, max_tokens = opts.batch_size, opts.max_tokens
    d = set_dir(run, which)
    found = _need(d / "find.json", "find")
    recorded = {"corpus": corpus, "seq_len": seq_len, "top_k": top_k, "top_k_test": top_k_test, "keep": keep,
                "max_prompt_tokens": max_prompt_tokens, "max_tokens": max_tokens}
    if trim_tolerance:   # recorded only when used, so earlier mine.json files keep their options
        recorded["trim_tolerance"] = trim_tolerance
    path = d / "mine.json"
    if not 0 < keep <= 1:
        raise HeadscopeError(f"--keep must be in (0, 1], got {keep}")
    tc = TokenCorpus(model, corpus, seq_len=seq_len, progress=progress)
    mining.check_corpus(tc, top_k, top_k_test)
    neurons = found["neurons"]
    src = source_hash(d / "find.json")
    out = [dict((k, n[k]) for k in ("layer", "neuron", "token_id", "token")) for n in neurons]
    layers = sorted(set(found.get("options", {}).get("layers") or []) | {n["layer"] for n in neurons})
    kk = max(top_k, top_k_test)
    documents = {}
    for split, key, k in (("train", "train", top_k), ("heldout", "test", top_k_test)):
        # the running top-kk of every neuron of these layers, cached for the other set (same layers)
        ckey = hashlib.sha1(f"{tc.dir.name}|{split}|{seq_len}|{max_tokens}|{kk}|{layers}".encode()).hexdigest()[:12]
        state_path = mine_cache_dir(run) / f"top_{ckey}.safetensors"
        full = mining.layer_top_sequences(model, tc, layers, split, kk, batch_size, max_tokens, state_path, progress)
        documents[split] = int(full["documents"]) if "documents" in full else None
        state = mining.select_neurons(full, layers, model.d_mlp, neurons, k)
        prompts = mining.trim_prompts(model, tc, split, neurons, state, keep, max_prompt_tokens, progress=progress,
                                     tolerance=trim_tolerance)
        for o, ps in zip(out, prompts):
            for p in ps:
                p["tokens"] = model.token_str(p["ids"])
            o[key] = ps
    write_json(path, {"options": recorded, "source": src, "documents_scanned": documents, "neurons": out})
    res = _mine_summary({"neurons": out}) | {"documents_scanned": documents}
    return res


def _mine_summary(data: dict) -> dict:
    tr = [len(n["train"]) for n in data["neurons"]]
    te = [len(n["test"]) for n in data["neurons"]]
    lens = [len(p["ids"]) for n in data["neurons"] for p in n["train"] + n["test"]]
    docs = {k: len({p["doc"] for n in data["neurons"] for p in n[k] if "doc" in p}) for k in ("train", "test")}
    return {"neurons": len(tr), "train_prompts": sum(tr), "test_prompts": sum(te), "prompt_documents": docs,
            "mean_prompt_tokens": float(np.mean(lens)) if lens else None}


# -- attribute ----------------------------------------------------------------------------------
def run_attribute(model: Model, run: RunDir, opts: AttributeOptions, progress: bool = True) -> dict:
    """The ``neurons.attribute`` stage. Writes ``<set>/attribution.safetensors`` (``A`` [N, P, L·H] float32, NaN for ineligible heads and
    padding; ``active`` [N, P, L·H] uint8; ``split`` [N, P] int8: 0 train, 1 test, −1 padding) and
    ``<set>/attribution.json``: ``{"options", "source", "neurons": [{layer, neuron, token, n_train,
    n_test, "heads": {"L.H": {frac_train, frac_test, mean_A}} (heads active at least once),
    "explain": ["L.H", …]}], "pairs": [{neuron, layer, head, name, frac_train, frac_test, mean_A,
    strength, baseline_pred}]}``. Pairs are chosen on all train prompts (active on ``low``–``high`` of
    them); ``frac_test`` is the pair's held-out active rate; ``strength`` = frac_test × mean_A (mean
    attribution over all prompts) picks each neuron's pair that matters for the ablation;
    ``baseline_pred``: the ‖z‖-only and z-probe predictions on the held-out prompts (:mod:`.baselines`)."""
    which, gated, norm_scale, k_sigma = opts.which, opts.gated, opts.norm_scale, opts.k_sigma
    low, high, batch_size = opts.low, opts.high, opts.batch_size
    d = set_dir(run, which)
    mined = _need(d / "mine.json", "mine")
    recorded = {"gated": gated, "norm_scale": norm_scale, "k_sigma": k_sigma, "low": low, "high": high}
    path = d / "attribution.json"
    neurons = mined["neurons"]
    rows, layer_of, neuron_of, where = [], [], [], []
    for i, n in enumerate(neurons):
        for s, key in enumerate(("train", "test")):
            for j, p in enumerate(n[key]):
                rows.append(p["ids"]); layer_of.append(n["layer"]); neuron_of.append(n["neuron"])
                where.append((i, s, j + (len(n["train"]) if s else 0)))
    if not rows:
        raise HeadscopeError("no mined prompts to attribute: every neuron's prompts were dropped (try a larger "
                             "--max-prompt-tokens or another corpus)")
    zs: dict = {}
    A_flat = attribution.attribute_prompts(model, rows, layer_of, neuron_of, gated, norm_scale, batch_size, progress,
                                           z_out=zs)
    P = max(len(n["train"]) + len(n["test"]) for n in neurons)
    K = model.n_layers * model.n_heads
    A = torch.full((len(neurons), P, K), float("nan"))
    split = torch.full((len(neurons), P), -1, dtype=torch.int8)
    row_of: dict[tuple[int, int], int] = {}
    for r, (i, s, j) in enumerate(where):
        A[i, j] = A_flat[r]
        split[i, j] = s
        row_of[i, j] = r
    active = attribution.active_heads(A, k_sigma)
    write_tensors(d / "attribution.safetensors", {"A": A, "active": active.to(torch.uint8), "split": split})
    out, pairs = [], []
    for i, n in enumerate(neurons):
        tr, te = split[i] == 0, split[i] == 1
        frac_tr, explain = attribution.heads_to_explain(active[i], tr, low, high)
        frac_te, _ = attribution.heads_to_explain(active[i], te, low, high)
        meanA = torch.nanmean(torch.where((split[i] >= 0)[:, None], A[i], torch.nan), dim=0)
        heads = {}
        for k in torch.nonzero(active[i].any(0)).flatten().tolist():
            heads[attribution.head_name(model, k)] = {"frac_train": round(float(frac_tr[k]), 4),
                                                      "frac_test": round(float(frac_te[k]), 4),
                                                      "mean_A": round(float(meanA[k]), 5)}
        names = [attribution.head_name(model, k) for k in torch.nonzero(explain).flatten().tolist()]
        ok = (split[i] >= 0).nonzero().flatten().tolist()
        for k in torch.nonzero(explain).flatten().tolist():
            z = zs["z"][[row_of[i, j] for j in ok], k].float().numpy()
            base = baselines.pair_baselines(z, active[i, ok, k].numpy(), split[i, ok].numpy())
            pairs.append({"neuron": i, "layer": k // model.n_heads, "head": k % model.n_heads,
                          "name": attribution.head_name(model, k), "frac_train": round(float(frac_tr[k]), 4),
                          "frac_test": round(float(frac_te[k]), 4), "mean_A": round(float(meanA[k]), 5),
                          "strength": round(float(frac_te[k] * meanA[k]), 6), "baseline_pred": base})
        out.append({"layer": n["layer"], "neuron": n["neuron"], "token": n["token"], "token_id": n["token_id"],
                    "n_train": int(tr.sum()), "n_test": int(te.sum()), "heads": heads, "explain": names})
    write_json(path, {"options": recorded, "source": source_hash(d / "mine.json"), "neurons": out, "pairs": pairs})
    res = {"pairs": len(pairs), "neurons_with_pairs": sum(1 for n in out if n["explain"])}
    return res


def load_attribution(run: RunDir, which: str = "top") -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(mine.json, attribution.json, attribution tensors) of a set."""
    d = set_dir(run, which)
    return _need(d / "mine.json", "mine"), _need(d / "attribution.json", "attribute"), \
        read_tensors(d / "attribution.safetensors")


def pair_labels(att: dict[str, torch.Tensor], n_heads: int, pair: dict) -> tuple[list[bool], list[int]]:
    """Active labels of a pair's head on its neuron's prompts (train then test order) and the split (0/1)."""
    i, k = pair["neuron"], pair["layer"] * n_heads + pair["head"]
    split = att["split"][i]
    ok = split >= 0
    return att["active"][i, ok, k].bool().tolist(), split[ok].tolist()


# -- ablate ---------------------------------------------------------------------------------------
def _ablate_set(model: Model, run: RunDir, which: str, max_pairs: int | None, mode: str, batch_size: int,
                progress: bool) -> dict:
    """Ablate a set's pairs; write its ablation.safetensors / .png; return the JSON content."""
    d = set_dir(run, which)
    mined, att_json, att = load_attribution(run, which)
    pairs = _round_robin(att_json["pairs"])[:max_pairs] if max_pairs else att_json["pairs"]
    if not pairs:
        raise HeadscopeError(f"no (neuron, head) pairs to ablate in the {which} set: no head is active on 25–75% "
                             "of any neuron's prompts; mine more prompts or neurons")
    # the causal test runs on the held-out prompts (the pairs were chosen on the train prompts); a prompt's
    # document is its cluster: prompts of one document are not independent
    prompts = [[p["ids"] for p in n["test"]] for n in mined["neurons"]]
    docs = [[p.get("doc", -1 - j) for j, p in enumerate(n["test"])] for n in mined["neurons"]]
    tokens = [n["token_id"] for n in mined["neurons"]]
    drops = ablation.ablation_drops(model, pairs, prompts, tokens, batch_size, progress, mode)
    P = max(len(x) for x in drops)
    D = torch.full((len(pairs), P), float("nan"))
    ACT = torch.zeros((len(pairs), P), dtype=torch.uint8)
    rows, act_all, inact_all = [], [], []
    for r, (pair, dr) in enumerate(zip(pairs, drops)):
        labels, split = pair_labels(att, model.n_heads, pair)
        labels = [lab for lab, sp in zip(labels, split) if sp == 1]
        lab = torch.tensor(labels, dtype=torch.bool)
        D[r, : len(dr)] = dr
        ACT[r, : len(dr)] = lab.to(torch.uint8)
        a, ia = dr[lab].tolist(), dr[~lab].tolist()
        act_all += a; inact_all += ia
        mw = mann_whitney(a, ia, alternative="greater")
        cb = baselines.cluster_bootstrap_diff(dr.tolist(), labels, docs[pair["neuron"]][: len(dr)])
        rows.append({**{k: pair[k] for k in ("neuron", "layer", "head", "name")},
                     "strength": pair.get("strength"), "frac_test": pair.get("frac_test"),
                     "mean_drop_active": float(np.mean(a)) if a else None,
                     "mean_drop_inactive": float(np.mean(ia)) if ia else None, "n_active": len(a), "n_inactive": len(ia),
                     "effect": float(np.mean(a) - np.mean(ia)) if a and ia else None,
                     "effect_low": cb["low"], "effect_high": cb["high"], "documents": cb["clusters"],
                     "p": cb["p_greater"], "p_mann_whitney": mw["p"], "auc": mw["auc"]})
    n_sig = 0
    for r, q in zip(rows, bh([r["p"] for r in rows])):
        r["q"] = q
        r["significant"] = q is not None and q < 0.05
        n_sig += r["significant"]
    per_neuron = _neuron_effects(rows)
    summary = {"unit": "neuron", "pairs": len(rows), "neurons": len(per_neuron),
               "effect": bootstrap_mean(list(per_neuron.values())),
               "wilcoxon": wilcoxon_signed(list(per_neuron.values())), "significant_bh": n_sig,
               "pooled_descriptive": {"active": describe(act_all), "inactive": describe(inact_all)}}
    write_tensors(d / "ablation.safetensors", {"drops": D, "active": ACT})
    from .plots import histogram_png
    histogram_png(d / "ablation.png", {"head active": act_all, "head inactive": inact_all},
                  f"Drop in P(neuron's token) when the head is zeroed ({which} neurons)", "P(clean) − P(ablated)")
    return {"options": {"max_pairs": max_pairs, "mode": mode}, "source": source_hash(d / "attribution.json"),
            "pairs": rows, "per_neuron": {str(k): v for k, v in per_neuron.items()}, "summary": summary}


def _round_robin(pairs: list[dict]) -> list[dict]:
    """Pairs reordered one per neuron at a time (each neuron's strongest pair, then each one's second, …),
    so that ``max_pairs`` spreads the ablations over neurons — the unit of the test — instead of taking
    every pair of the first neurons. Strongest: the largest ``strength`` = held-out active rate × mean
    attribution (the pair that matters for the neuron; head order used to pick heads active on a few
    prompts, some on none held out)."""
    by: dict[int, list[dict]] = {}
    for p in sorted(pairs, key=lambda p: -(p.get("strength") or 0.0)):
        by.setdefault(p["neuron"], []).append(p)
    out, r = [], 0
    while len(out) < len(pairs):
        out += [ps[r] for ps in by.values() if r < len(ps)]
        r += 1
    return out


def _neuron_effects(rows: list[dict]) -> dict[int, float]:
    """Mean of the pairs' effects per neuron (pairs of one neuron share its prompts: not independent)."""
    acc: dict[int, list[float]] = {}
    for r in rows:
        if r["effect"] is not None:
            acc.setdefault(r["neuron"], []).append(r["effect"])
    return {k: float(np.mean(v)) for k, v in sorted(acc.items())}


def run_ablate(model: Model, run: RunDir, opts: AblateOptions, progress: bool = True) -> dict:
    """The ``neurons.ablate`` stage: the causal check. For each pair: drop = P_clean(t) − P_ablated(t) on
    each of its neuron's held-out prompts (the pairs were chosen on the train prompts)
    (:mod:`headscope.neurons.ablation`); its effect = mean drop where the head was active − where it was
    not, with a document-clustered percentile bootstrap CI and one-sided p (prompts of one document are
    not independent; :func:`headscope.neurons.baselines.cluster_bootstrap_diff`; the Mann–Whitney p that
    treats prompts as independent is kept as ``p_mann_whitney``) and BH q over the pairs. With
    ``max_pairs``, each neuron's strongest pair comes first (:func:`_round_robin`). The unit of the run's test is the **neuron** (its pairs share prompts):
    the per-neuron mean effect, its bootstrap 95 % interval, and a Wilcoxon signed-rank test against 0.
    When both sets (top and random) have been ablated, :func:`compare_ablations` compares them.

    Writes ``<set>/ablation.json``: ``{"options", "source", "pairs": [{neuron, layer, head, name, strength,
    frac_test, mean_drop_active, mean_drop_inactive, n_active, n_inactive, effect, effect_low, effect_high,
    documents, p, p_mann_whitney, auc, q, significant}],
    "per_neuron": {i: effect}, "summary": {unit, pairs, neurons, effect: {mean, low, high, n}, wilcoxon,
    significant_bh, pooled_descriptive}}``, ``<set>/ablation.safetensors`` (``drops`` [n_pairs, P]
    NaN-padded, ``active`` [n_pairs, P] uint8) and ``<set>/ablation.png``."""
    which, max_pairs, mode, batch_size = opts.which, opts.max_pairs, opts.mode, opts.batch_size
    d = set_dir(run, which)
    load_attribution(run, which)
    path = d / "ablation.json"
    ablation.ablated_heads(model, 0, mode)  # checks the mode before any work
    res = _ablate_set(model, run, which, max_pairs, mode, batch_size, progress)
    write_json(path, res)
    out = _ablate_summary(res)
    if all((set_dir(run, w) / "ablation.json").is_file() for w in SETS):
        out["vs_random"] = compare_ablations(run)
    return out


def compare_ablations(run: RunDir) -> dict:
    """Per-neuron ablation effects of the congruent vs the random neurons (Mann–Whitney, bootstrap
    difference of means); writes ``neurons/ablation_vs_random.json``."""
    eff = {w: list(read_json(set_dir(run, w) / "ablation.json")["per_neuron"].values()) for w in SETS}
    res = {"unit": "neuron", "top": bootstrap_mean(eff["top"]), "random": bootstrap_mean(eff["random"]),
           "difference": bootstrap_diff_of_means(eff["top"], eff["random"]),
           "mann_whitney": mann_whitney(eff["top"], eff["random"])}
    write_json(set_dir(run, "top") / "ablation_vs_random.json", res)
    return res


def _ablate_summary(data: dict) -> dict:
    s = data["summary"]
    return {"pairs": s["pairs"], "neurons": s["neurons"], "effect": s["effect"], "wilcoxon": s["wilcoxon"],
            "significant_bh": s["significant_bh"]}
