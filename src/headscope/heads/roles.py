"""The role battery of every head: ``headscope heads roles`` → RUN/heads/roles.json (docs/roles.md).

For each role: a score per head on held-out data (:mod:`.battery`, :mod:`.scores`, :mod:`.ov`), the same
score under a control that shows what "no role" looks like, a 95 % CI clustered by the independent unit
(document, sequence, example or task token), a one-sided test of score > control and Benjamini–Hochberg over
heads. A role is *shown* when its q-value ≤ q and the score passes the role's own threshold. Then the causal
check (:mod:`.causal`): every head screened by attribution patching on the role's task, the heads a role shows
(and the screen's top heads) ablated for real; a role is *confirmed* when its causal effect has the sign the
role predicts, its CI excludes 0 and its BH q-value ≤ q (sink heads: KL(clean ‖ ablated) below a bound).
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import torch
from scipy import stats as _st

from ..data import TokenCorpus
from ..sampling import Windows
from ..models.load import Model
from ..runs import RunDir, write_json, write_tensors
from ..stats import clustered_mean_se, one_sided_p
from . import causal as C
from .battery import MAX_OFFSET, text_stats
from .options import RolesOptions
from .results import RolesResult
from .ov import copying_scores, successor_hits
from .scores import (prefix_induction_examples, prefix_induction_per_example, repeat_scores_per_seq,
                     repeated_random_tokens)

VERSION = 1

ROLE_TEXT = {
    "induction": dict(
        title="Induction head",
        phrase="attends to the token after the previous occurrence of the current token",
        definition="Mean attention from each token of the second copy of a repeated random-token sequence "
                   "[BOS, r, r] to the token after its first occurrence.",
        source="Olsson et al. 2022 (arXiv 2209.11895)", score_name="induction score"),
    "previous_token": dict(
        title="Previous-token head", phrase="attends to the previous token",
        definition="Mean attention from every position t ≥ 1 of repeated random-token sequences to position t − 1.",
        source="Olsson et al. 2022 (arXiv 2209.11895); Elhage et al. 2021", score_name="previous-token score"),
    "duplicate_token": dict(
        title="Duplicate-token head", phrase="attends to the previous occurrence of the current token",
        definition="Mean attention from each token of the second copy of a repeated random-token sequence to "
                   "the same token in the first copy.",
        source="Wang et al. 2022 (arXiv 2211.00593)", score_name="duplicate-token score"),
    "prefix_induction": dict(
        title="Prefix-induction head",
        phrase="attends to the token after an earlier copy of the current multi-token prefix",
        definition="Attention from the last token of a copied prefix (random tokens) to the token after the "
                   "prefix's first occurrence.",
        source="Kissane et al. 2024 (arXiv 2406.17759)", score_name="prefix-induction score"),
    "sink": dict(
        title="Attention-sink head", phrase="puts its attention on the first token (a no-op by default)",
        definition="Mean attention to position 0 from positions ≥ 1 of held-out natural-text windows (α_0).",
        source="Xiao et al. 2023 (arXiv 2309.17453); Gu et al. 2024 (arXiv 2410.10781)", score_name="sink score"),
    "local": dict(
        title="Local (fixed-offset) head", phrase="attends to the token a fixed number of positions back",
        definition="Mean attention at the head's preferred offset k ∈ 1..8 (chosen on half of the held-out "
                   "natural-text windows, measured on the other half), position 0 left out.",
        source="Voita et al. 2019 (arXiv 1905.09418, positional heads)", score_name="fixed-offset attention"),
    "copying": dict(
        title="Copying head", phrase="raises the logit of the token it attends to",
        definition="Direct logit contribution (through the final norm's actual scale, W_U centred) to the token "
                   "at the position the head attends to most, on held-out natural text; the weight-based OV "
                   "copying score Σ Re λ / Σ |λ| is given beside it.",
        source="Elhage et al. 2021 (A Mathematical Framework, § copying); McDougall et al. 2023 (arXiv 2310.04625)",
        score_name="direct logit to the attended token"),
    "copy_suppression": dict(
        title="Copy-suppression head", phrase="lowers the logit of the token it attends to",
        definition="Minus the direct logit contribution to the token at the position the head attends to "
                   "most, on held-out natural text (through the final norm's actual scale, W_U centred).",
        source="McDougall et al. 2023 (arXiv 2310.04625)", score_name="suppression of the attended token (logits)"),
    "successor": dict(
        title="Successor head", phrase="maps an ordinal token to its successor (1→2, Monday→Tuesday)",
        definition="Succession score: fraction of tokens t of ordinal sets (numbers, number words, ordinals, "
                   "days, months, letters) whose successor has the highest logit among the set's tokens in "
                   "the head's OV image of the effective embedding.",
        source="Gould et al. 2023 (arXiv 2312.09230)", score_name="succession score"),
}
ROLES = tuple(ROLE_TEXT)

CAUSAL_TEXT = {
    "induction": dict(task="the second copy of repeated random-token sequences",
                      metric="loss on the second copy (nats/token)", expected_sign=1, key=("repeat", "loss"),
                      effect_phrase="ablating it raises the loss on the second copy of repeated text by {effect:.2f} "
                                    "[{lo:.2f}, {hi:.2f}] nats/token"),
    "prefix_induction": dict(task="the second copy of repeated random-token sequences",
                             metric="loss on the second copy (nats/token)", expected_sign=1, key=("repeat", "loss"),
                             effect_phrase="ablating it raises the loss on the second copy of repeated text by "
                                           "{effect:.2f} [{lo:.2f}, {hi:.2f}] nats/token"),
    "previous_token": dict(task="repeated random-token sequences",
                           metric="mean induction score of the induction heads (attention)", expected_sign=-1,
                           key=("repeat", "induction"),
                           effect_phrase="ablating it changes the induction heads' induction score by {effect:.3f} "
                                         "[{lo:.3f}, {hi:.3f}]"),
    "sink": dict(task="held-out natural text", metric="KL(clean ‖ ablated) of the next-token distribution "
                 "(nats/token)", expected_sign=0, key=("text", "kl"),
                 effect_phrase="ablating it moves the next-token distribution by only {effect:.4f} "
                               "[{lo:.4f}, {hi:.4f}] nats/token (KL)"),
    "copying": dict(task="held-out natural text", metric="centred logit of the token the head attends to most",
                    expected_sign=-1, key=("text", "attended"),
                    effect_phrase="ablating it changes the logit of the attended token by {effect:.3f} "
                                  "[{lo:.3f}, {hi:.3f}]"),
    "copy_suppression": dict(task="held-out natural text",
                             metric="centred logit of the token the head attends to most", expected_sign=1,
                             key=("text", "attended"),
                             effect_phrase="ablating it raises the logit of the attended token by {effect:.3f} "
                                           "[{lo:.3f}, {hi:.3f}]"),
    "duplicate_token": dict(task="indirect-object (IOI) prompts: \"When Mary and John went to the store, John gave "
                                 "a drink to\"", metric="logit difference logit(IO) − logit(S) at the last token",
                            expected_sign=-1, key=("ioi", "logit_diff"),
                            effect_phrase="ablating it changes the IO − S logit difference on IOI prompts by "
                                          "{effect:.2f} [{lo:.2f}, {hi:.2f}]",
                            control_task="the same prompts with the subject not repeated (ABC: \"…, Kate gave a "
                                         "drink to\")",
                            control_phrase="by {effect:.2f} [{lo:.2f}, {hi:.2f}] when the subject is not repeated"),
    "local": dict(task="held-out natural text", metric="next-token loss (nats/token)", expected_sign=1,
                  key=("text", "loss"),
                  effect_phrase="ablating it raises the next-token loss on held-out text by {effect:.3f} "
                                "[{lo:.3f}, {hi:.3f}] nats/token"),
    "successor": dict(task="runs of consecutive ordinal tokens (numbers, days, months, letters …)",
                      metric="log-probability of the next ordinal item", expected_sign=-1,
                      key=("successor", "logprob"),
                      effect_phrase="ablating it changes the log-probability of the next ordinal item by "
                                    "{effect:.3f} [{lo:.3f}, {hi:.3f}]"),
}


# -- statistics --------------------------------------------------------------------------------------------

def _tcrit(G: int) -> float:
    return float(_st.t.ppf(0.975, G - 1)) if G >= 2 else float("nan")


def q_values(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (NaN where p is NaN)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = _st.false_discovery_control(p[ok], method="bh")
    return out


def unit_test(x: np.ndarray, c: np.ndarray, clusters) -> dict[str, np.ndarray]:
    """Score, control, 95 % CI of the score and one-sided p of score > control, from per-unit values
    x, c [n, ...] (c broadcastable), clustered by ``clusters`` [n]."""
    x = np.asarray(x, dtype=np.float64)
    c = np.broadcast_to(np.asarray(c, dtype=np.float64), x.shape)
    mx, sx, G = clustered_mean_se(np.moveaxis(x, 0, -1), clusters=clusters)
    mc, _, _ = clustered_mean_se(np.moveaxis(c, 0, -1), clusters=clusters)
    md, sd, _ = clustered_mean_se(np.moveaxis(x - c, 0, -1), clusters=clusters)
    t = _tcrit(G)
    z = np.where(sd > 0, md / np.where(sd > 0, sd, 1), np.nan)
    return {"score": mx, "control": mc, "lo": mx - t * sx, "hi": mx + t * sx, "p": _p(md, sd, G), "gap": md, "z": z}


def _p(estimate, se, G: int) -> np.ndarray:
    """One-sided p of estimate > 0 (t with G − 1 df); a zero SE over ≥ 2 clusters (every unit agrees) gives
    p = 0 for a positive estimate and 1 otherwise; fewer than 2 clusters give NaN (never a discovery)."""
    est, se = np.asarray(estimate, dtype=np.float64), np.asarray(se, dtype=np.float64)
    p = np.asarray(one_sided_p(est, se, G - 1), dtype=np.float64)
    if G >= 2:
        p = np.where(se == 0, np.where(est > 0, 0.0, 1.0), p)
    return p


def _grid(a) -> list:
    """[L][H] nested list, NaN → None."""
    a = np.asarray(a, dtype=np.float64)
    return [[None if not math.isfinite(v) else round(float(v), 6) for v in row] for row in a]


def _ci_grid(lo, hi) -> list:
    return [[None if not (math.isfinite(a) and math.isfinite(b)) else [round(float(a), 6), round(float(b), 6)]
             for a, b in zip(r1, r2)] for r1, r2 in zip(np.asarray(lo, float), np.asarray(hi, float))]


def _bool_grid(a) -> list:
    return [[bool(v) for v in row] for row in np.asarray(a)]


# -- the battery ----------------------------------------------------------------------------------------------

def _uniform(ts) -> float:
    """Attention a uniform causal head gives one source, averaged over destinations ``ts``."""
    return float(np.mean([1.0 / (t + 1) for t in ts]))


def measure(model: Model, opts: RolesOptions, win: Windows, progress: bool = True) -> tuple[dict, dict, dict]:
    """Every role's test (:func:`unit_test` output plus threshold and names), the per-unit tensors, and the data
    description."""
    L, H, S = model.n_layers, model.n_heads, opts.seq_len
    tests: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}

    # natural text
    docs = np.asarray(win.docs[:opts.text_seqs])
    ts = text_stats(model, win.batches(opts.batch_size, opts.text_seqs), opts.text_seqs, opts.seed, progress)
    tensors |= {f"text_{k}": v for k, v in ts.items()}
    sink = ts["sink"].numpy()
    tests["sink"] = unit_test(sink, _uniform(range(1, S)), docs) | {
        "control_name": "uniform causal attention", "threshold": opts.attn_threshold}
    offs = ts["offset"].numpy()  # [n, L, H, 8]
    pick, test_rows = np.arange(0, len(docs), 2), np.arange(1, len(docs), 2)
    best = offs[pick].mean(0).argmax(-1)  # [L, H] offset index chosen on even windows
    at_best = np.take_along_axis(offs[test_rows], best[None, ..., None], -1)[..., 0]
    tests["local"] = unit_test(at_best, _uniform(range(MAX_OFFSET + 1, S)), docs[test_rows]) | {
        "control_name": "uniform causal attention", "threshold": opts.attn_threshold, "offset": best + 1}
    profile = np.concatenate([offs[..., :3], offs[..., 3:].sum(-1, keepdims=True), ts["far"].numpy()[..., None]],
                             -1).mean(0)  # [L, H, 5]: offsets 1, 2, 3, 4–8, > 8
    att, rnd = ts["copy_att"].numpy(), ts["copy_rand"].numpy()
    tests["copying"] = unit_test(att, rnd, docs) | {"control_name": "a random token of the same context",
                                                    "threshold": opts.copy_threshold, "gap_threshold": True}
    tests["copy_suppression"] = unit_test(-att, -rnd, docs) | {
        "control_name": "a random token of the same context", "threshold": opts.copy_threshold, "gap_threshold": True}

    # repeated random tokens
    seqs = repeated_random_tokens(model, opts.rep_seqs, opts.half_len, opts.seed)
    rep = repeat_scores_per_seq(model, seqs, opts.half_len, opts.batch_size, progress=progress)
    tensors |= {f"repeat_{k}": v for k, v in rep.items()}
    hl = opts.half_len
    t2, t_all = range(hl + 1, 2 * hl + 1), range(1, 2 * hl + 1)
    seq_ids = np.arange(opts.rep_seqs)
    for role, key, ts_ in (("induction", "induction", t2), ("previous_token", "prev_token", t_all),
                           ("duplicate_token", "duplicate_token", t2)):
        tests[role] = unit_test(rep[key].numpy(), _uniform(ts_), seq_ids) | {
            "control_name": "uniform causal attention", "threshold": opts.attn_threshold}

    if opts.prefix_examples:
        toks, dest, src = prefix_induction_examples(model, opts.prefix_len, opts.prefix_examples,
                                                      opts.prefix_seq_len, opts.seed)
        pre = prefix_induction_per_example(model, toks, dest, src, opts.batch_size)
        tensors["prefix_induction"] = pre
        ctrl = (1.0 / (dest.double() + 1)).numpy()[:, None, None]
        tests["prefix_induction"] = unit_test(pre.numpy(), ctrl, np.arange(len(dest))) | {
            "control_name": "uniform causal attention", "threshold": opts.attn_threshold}

    # successor heads (weights)
    hits, ctrl_hits, names = successor_hits(model, opts.seed)
    if len(names) >= 2:
        tests["successor"] = unit_test(hits.float().numpy(), ctrl_hits.float().numpy(), np.arange(len(names))) | {
            "control_name": "a random other item of the same ordinal set as the target",
            "threshold": opts.successor_threshold, "n_tokens": len(names), "sets": sorted(set(names))}
    else:
        nan = np.full((L, H), np.nan)
        tests["successor"] = {"score": nan, "control": nan, "lo": nan, "hi": nan, "p": nan, "gap": nan, "z": nan,
                              "control_name": "a random other item of the same ordinal set as the target",
                              "threshold": opts.successor_threshold, "n_tokens": 0, "sets": [],
                              "note": "the tokenizer spells no ordinal set as single tokens"}

    # OV copying score (weights), beside copying / copy suppression
    ov, null = copying_scores(model, opts.null_draws, opts.seed)
    ov_np, null_np = ov.numpy(), null.numpy()
    if opts.null_draws >= 2:  # normal approximation of the null (empirical p-values bottom out at 1/(draws + 1))
        mu, sd = null_np.mean(-1)[:, None], null_np.std(-1, ddof=1)[:, None]
        zs = (ov_np - mu) / np.maximum(sd, 1e-12)
        p_copy, p_supp = _st.norm.sf(zs), _st.norm.cdf(zs)
    else:
        p_copy = p_supp = np.full((L, H), np.nan)
    tensors["ov_copying"], tensors["ov_null"] = ov, null
    weights = {"name": "OV-circuit copying score Σ Re λ / Σ |λ| (norm weights folded, W_U centred, W_E)",
               "score": _grid(ov_np),
               "null_name": f"{opts.null_draws} random Gaussian OV circuits per layer (p from a normal fit to them)",
               "null_mean": [None if not math.isfinite(v) else round(float(v), 6) for v in
                             (null_np.mean(-1) if opts.null_draws else np.full(L, np.nan))]}
    tests["copying"]["weights"] = weights | {"p": _grid(p_copy), "q_value": _grid(q_values(p_copy))}
    tests["copy_suppression"]["weights"] = weights | {"p": _grid(p_supp), "q_value": _grid(q_values(p_supp))}
    tensors["offset_profile"] = torch.from_numpy(profile).float()

    data = {"documents": int(len(np.unique(docs))), "sequences": int(opts.text_seqs),
            "tokens": int(opts.text_seqs * S), "split": "heldout", "corpus": opts.corpus,
            "repeated_sequences": opts.rep_seqs, "half_len": hl, "prefix_examples": opts.prefix_examples,
            "prefix_len": opts.prefix_len, "prefix_seq_len": opts.prefix_seq_len,
            "offset_bins": ["1", "2", "3", "4-8", ">8"],
            "offset_profile": [[[round(float(v), 5) for v in profile[l, h]] for h in range(H)] for l in range(L)]}
    return tests, tensors, data


def decide(tests: dict, q: float) -> None:
    """Add q-values and the ``passed`` decision to every role's test, in place."""
    for role, t in tests.items():
        t["q_value"] = q_values(t["p"])
        # copying roles: the gap over the control must reach the threshold and the score itself have the role's
        # sign (a copy-suppression head lowers the attended token's logit, not merely raises it less than others)
        own = (t["gap"] >= t["threshold"]) & (t["score"] > 0) if t.get("gap_threshold") else \
            t["score"] >= t["threshold"]
        with np.errstate(invalid="ignore"):
            t["passed"] = (t["q_value"] <= q) & np.nan_to_num(own, nan=0).astype(bool)


# -- causal checks ----------------------------------------------------------------------------------------------

def _top(values: np.ndarray, mask: np.ndarray | None, k: int) -> list[tuple[int, int]]:
    """(layer, head) of the k largest finite ``values`` [L, H] (within ``mask``)."""
    v = np.where(np.isfinite(values), values, -np.inf)
    if mask is not None:
        v = np.where(mask, v, -np.inf)
    order = np.argsort(-v, axis=None)
    out = []
    for i in order[:k]:
        if not np.isfinite(v.flat[i]):
            break
        out.append(tuple(int(x) for x in np.unravel_index(i, v.shape)))
    return out


def causal_checks(model: Model, opts: RolesOptions, win: Windows, tests: dict,
                  progress: bool = True) -> tuple[dict, dict]:
    """Screens, real ablations and their statistics per role with a causal test; and the agreement summary."""
    L, H = model.n_layers, model.n_heads
    ind = tests["induction"]
    readers = _top(ind["score"], ind["passed"], 8) or _top(ind["score"], None, 3)
    rep = C.Task("repeat", repeated_random_tokens(model, opts.task_seqs, opts.half_len, opts.seed + 1),
                 np.arange(opts.task_seqs), half_len=opts.half_len, readers=readers)
    lo, hi = opts.text_seqs, opts.text_seqs + opts.task_seqs
    text = C.Task("text", win.ids(lo, hi)[:, :min(opts.task_len, opts.seq_len)], np.asarray(win.docs[lo:hi]))
    prompts = C.successor_prompts(model, max_prompts=6 * opts.task_seqs, seed=opts.seed)
    succ = C.Task("successor", prompts[0], prompts[1]) if prompts is not None else None
    ioi = C.ioi_task(model, opts.ioi_prompts, opts.seed) if opts.ioi_prompts else None
    tasks = {"repeat": rep, "text": text, **({"successor": succ} if succ is not None else {}),
             **({"ioi": ioi} if ioi is not None else {})}
    if ioi is None:
        tests["duplicate_token"]["note"] = ("no causal task: --ioi-prompts is 0" if not opts.ioi_prompts else
                                            "no causal task: the tokenizer spells fewer than 3 of the IOI names as "
                                            "single tokens")
    t0 = time.perf_counter()
    for t in tasks.values():
        C.run_clean(model, t)
        _log(progress, f"head roles: clean pass of the {t.name} task ({tuple(t.ids.shape)})")

    ab = opts.ablation
    half = opts.half_len
    screens = {
        ("repeat", "loss"): C.atp(model, rep, lambda o: C.repeat_loss(o.logprobs, rep.ids, half), ab),
        ("repeat", "induction"): C.atp(
            model, rep, lambda o: C.induction_attention(o["pattern"], readers, half), ab, what=("pattern",),
            layers=sorted({l for l, _ in readers}), stop_after=max(l for l, _ in readers)),
        ("text", "loss"): C.atp(model, text, lambda o: C.next_token_loss(o.logprobs, text.ids), ab),
        ("text", "attended"): C.copy_screen(model, text, ab),
    }
    if succ is not None:
        screens[("successor", "logprob")] = C.atp(model, succ, lambda o: C.successor_logprob(o.logprobs, succ.ids), ab)
    if ioi is not None:
        sub = ioi.metric_rows()  # the screen needs no control twins
        screens[("ioi", "logit_diff")] = C.atp(model, sub, lambda o: C.logit_diff(o.logits, sub.answers), ab,
                                               what=("logits",), logit_positions=sub.ends)
    _log(progress, f"head roles: clean passes and attribution-patching screens {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()

    # which heads each task ablates
    plan: dict[str, set] = {k: set() for k in tasks}
    chosen: dict[str, list] = {}
    for role, ct in CAUSAL_TEXT.items():
        task_name, metric = ct["key"]
        if role not in tests or task_name not in tasks:
            continue
        t = tests[role]
        heads = _top(t["score"], t["passed"], opts.max_ablations)
        if ct["expected_sign"] != 0:
            heads += [h for h in _top(ct["expected_sign"] * screens[(task_name, metric)].numpy(), None,
                                      opts.confirm_top) if h not in heads]
        chosen[role] = heads
        plan[task_name] |= set(heads)
    effects: dict[tuple[str, int, int], dict] = {}
    n_abl = sum(len(v) for v in plan.values())
    done = 0
    per_task = {}
    for task_name, heads in plan.items():
        t1 = time.perf_counter()
        for l, h in sorted(heads):
            effects[(task_name, l, h)] = C.ablate(model, tasks[task_name], l, h, ab)
            done += 1
            if progress and done % 10 == 0:
                _log(progress, f"head roles: {done}/{n_abl} ablations")
        per_task[task_name] = f"{len(heads)} in {time.perf_counter() - t1:.1f} s"
    _log(progress, f"head roles: ablations per task: {per_task}")

    _log(progress, f"head roles: {n_abl} real ablations {time.perf_counter() - t0:.1f} s")
    out, pairs = {}, {}
    for role, ct in CAUSAL_TEXT.items():
        if role not in chosen:
            continue
        task_name, metric = ct["key"]
        task = tasks[task_name]
        eff, lo_, hi_, p = (np.full((L, H), np.nan) for _ in range(4))
        ctrl = [np.full((L, H), np.nan) for _ in range(3)]  # effect on the control twins: mean, lo, hi
        contrast = [np.full((L, H), np.nan) for _ in range(4)]  # effect − control effect: mean, lo, hi, p
        for l, h in chosen[role]:
            e = effects[(task_name, l, h)].get(metric)
            if e is None:
                continue
            clusters = clusters_of(task)
            m, se, G = clustered_mean_se(e.double().numpy(), clusters=clusters)
            tc = _tcrit(G)
            eff[l, h], lo_[l, h], hi_[l, h] = m, m - tc * se, m + tc * se
            ce = effects[(task_name, l, h)].get(metric + "_control")
            if ce is not None:  # the same ablation on the control twins, and the paired difference
                for grid, x in ((ctrl, ce), (contrast, e - ce)):
                    mc, sc, Gc = clustered_mean_se(x.double().numpy(), clusters=clusters)
                    grid[0][l, h], grid[1][l, h], grid[2][l, h] = mc, mc - _tcrit(Gc) * sc, mc + _tcrit(Gc) * sc
                    if grid is contrast:
                        grid[3][l, h] = _p(ct["expected_sign"] * mc, sc, Gc)
            if ct["expected_sign"] == 0:
                p[l, h] = _p(opts.sink_kl_bound - m, se, G)
            else:
                p[l, h] = _p(ct["expected_sign"] * m, se, G)
                pairs[(task_name, metric, l, h)] = (float(screens[(task_name, metric)][l, h]), float(m))
        qv = q_values(p)
        with np.errstate(invalid="ignore"):
            if ct["expected_sign"] == 0:
                passed = (qv <= opts.q) & (hi_ < opts.sink_kl_bound)
            else:
                s = ct["expected_sign"]
                passed = (qv <= opts.q) & (s * lo_ > 0) & (s * hi_ > 0)
        screen_key = ("text", "loss") if role == "sink" else (task_name, metric)
        out[role] = {
            "task": ct["task"], "metric": ct["metric"], "ablation": ab,
            "effect": _grid(eff), "ci": _ci_grid(lo_, hi_), "q_value": _grid(qv),
            "expected_sign": ct["expected_sign"], "effect_phrase": ct["effect_phrase"],
            "screen": _grid(screens[screen_key].numpy()),
            "screen_metric": "next-token loss (KL has zero gradient at the clean run)" if role == "sink" else
            ("direct path only: (z_ablated − z)·W_O·P·γ_f·W_Uc[attended]/σ" if (task_name, metric) ==
             ("text", "attended") else ct["metric"]),
            "passed": _bool_grid(np.nan_to_num(passed, nan=0).astype(bool)),
            "_passed": np.asarray(passed, dtype=bool),
            # order of "confirmed": |effect| / CI width; a sink's claim ("no effect") is the weakest, last
            "_z": np.zeros((L, H)) if role == "sink" else
            np.where(np.isfinite(eff), np.abs(eff) / np.maximum(hi_ - lo_, 1e-12), np.nan),
        }
        if "control_task" in ct:
            out[role] |= {
                "control_task": ct["control_task"], "control_phrase": ct["control_phrase"],
                "control_effect": _grid(ctrl[0]), "control_ci": _ci_grid(ctrl[1], ctrl[2]),
                "contrast": _grid(contrast[0]), "contrast_ci": _ci_grid(contrast[1], contrast[2]),
                "contrast_q": _grid(q_values(contrast[3])),
                "contrast_note": "effect on the prompts − effect on their control twins, paired by prompt "
                                 "(the role predicts it has the effect's sign); reported, not part of the decision"}
        if task_name == "ioi":
            out[role] |= {"prompts": int((~task.control).sum()), "name_pairs": int(len(np.unique(clusters_of(task)))),
                          "clusters": "name pair {IO, S}"}
        if role == "sink":
            out[role]["bound"] = opts.sink_kl_bound
        if role == "previous_token":
            out[role]["readers"] = [f"{l}.{h}" for l, h in readers]
        if task_name == "text":
            out[role]["documents"] = int(len(np.unique(task.clusters)))
    agreement = _agreement(pairs)
    return out, agreement


def clusters_of(task: C.Task) -> np.ndarray:
    """The clusters of a task's metric rows (the ioi task's control twins left out)."""
    return task.clusters if task.control is None else task.clusters[~task.control]


def _agreement(pairs: dict) -> dict:
    if len(pairs) < 3:
        return {"spearman": None, "n": len(pairs)}
    sc, ef = zip(*pairs.values())
    rho = _st.spearmanr(sc, ef).statistic
    by = {}
    for (task, metric, _, _), v in pairs.items():
        by.setdefault(f"{task}:{metric}", []).append(v)
    per = {k: {"spearman": (None if len(v) < 3 or not math.isfinite(r := _st.spearmanr(*zip(*v)).statistic)
                            else round(float(r), 4)), "n": len(v)} for k, v in by.items()}
    return {"spearman": round(float(rho), 4) if math.isfinite(rho) else None, "n": len(pairs), "by_metric": per}


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr)


# -- the stage --------------------------------------------------------------------------------------------------

def build_document(model: Model, opts: RolesOptions, tests: dict, causal: dict, agreement: dict, data: dict) -> dict:
    """roles.json (the schema in docs/roles.md)."""
    L, H = model.n_layers, model.n_heads
    roles = {}
    for role in ROLES:
        if role not in tests:
            continue
        t = tests[role]
        c = causal.get(role)
        conf = (t["passed"] & c["_passed"]) if c is not None else np.zeros((L, H), bool)
        entry = dict(ROLE_TEXT[role]) | {
            "score": _grid(t["score"]), "control": _grid(t["control"]), "control_name": t["control_name"],
            "ci": _ci_grid(t["lo"], t["hi"]), "p": _grid(t["p"]), "q_value": _grid(t["q_value"]),
            "threshold": t["threshold"], "passed": _bool_grid(t["passed"]),
            "causal": None if c is None else {k: v for k, v in c.items() if not k.startswith("_")},
            "confirmed": _bool_grid(conf),
        }
        for extra in ("weights", "n_tokens", "sets", "note"):
            if extra in t:
                entry[extra] = t[extra]
        if role == "local":
            entry["offset"] = [[int(v) for v in row] for row in t["offset"]]
        roles[role] = entry
        t["_confirmed"] = conf
    heads = {}
    for l in range(L):
        for h in range(H):
            shown = [r for r in roles if tests[r]["passed"][l, h]]
            shown.sort(key=lambda r: -strength(tests[r], l, h))
            conf = [r for r in shown if tests[r]["_confirmed"][l, h]]
            conf.sort(key=lambda r: -np.nan_to_num(causal[r]["_z"][l, h], nan=0))
            heads[f"{l}.{h}"] = {"shown": shown, "confirmed": conf,
                                 "offset": int(tests["local"]["offset"][l, h]) if "local" in shown else None}
    return {"version": VERSION, "model": model.identity(), "n_layers": L, "n_heads": H, "q": opts.q, "data": data,
            "roles": roles,
            "screen": {"method": "attribution patching (AtP)", "agreement": agreement,
                       "note": "per head, one forward + backward per task metric: (z_ablated − z)·∂metric/∂z"},
            "heads": heads}


def strength(test: dict, l: int, h: int) -> float:
    """How far a shown role's score is past its own threshold (score / threshold; copying roles: gap / threshold),
    the order of ``shown``."""
    v = test["gap"][l, h] if test.get("gap_threshold") else test["score"][l, h]
    return float(np.nan_to_num(v / max(test["threshold"], 1e-12), nan=0.0))


def census(doc: dict) -> dict:
    """Per role: heads shown, ablated, confirmed; heads whose control passes the threshold."""
    out = {}
    for role, e in doc["roles"].items():
        flat = lambda g: [v for row in g for v in row]  # noqa: E731
        thr = e["threshold"]
        ctrl = [v for v in flat(e["control"]) if v is not None]
        out[role] = {"shown": sum(flat(e["passed"])), "confirmed": sum(flat(e["confirmed"])),
                     "ablated": 0 if e["causal"] is None else sum(v is not None for v in flat(e["causal"]["effect"])),
                     "control_name": e["control_name"],
                     "control_over_threshold": None if role in ("copying", "copy_suppression") else
                     sum(v >= thr for v in ctrl),
                     "causal": e["causal"] is not None}
    return out


def run_roles(model: Model, run: RunDir, opts: RolesOptions, progress: bool = True) -> RolesResult:
    """Measure every role of every head, screen and ablate, write RUN/heads/roles.json and roles.safetensors."""
    corpus = TokenCorpus(model, opts.corpus, seq_len=opts.seq_len, progress=progress)
    win = Windows(corpus, "heldout", seed=opts.seed)
    win.need(opts.text_seqs + opts.task_seqs, "the role battery (--text-seqs + --task-seqs)")
    model.check_length(max(opts.seq_len, 2 * opts.half_len + 1, opts.prefix_seq_len))
    t0 = time.perf_counter()
    tests, tensors, data = measure(model, opts, win, progress)
    decide(tests, opts.q)
    t1 = time.perf_counter()
    causal, agreement = causal_checks(model, opts, win, tests, progress)
    _log(progress, f"head roles: battery {t1 - t0:.1f} s, causal checks {time.perf_counter() - t1:.1f} s")
    doc = build_document(model, opts, tests, causal, agreement, data)
    out = run / "heads"
    write_tensors(out / "roles.safetensors", {k: v.float().contiguous() for k, v in tensors.items()})
    write_json(out / "roles.json", doc)
    cen = census(doc)
    return RolesResult(census=cen, n_heads=model.n_layers * model.n_heads,
                       heads_with_confirmed_role=sum(bool(v["confirmed"]) for v in doc["heads"].values()),
                       agreement=agreement, data={k: v for k, v in data.items() if k != "offset_profile"},
                       path=str(out / "roles.json"))
