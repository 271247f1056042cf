"""Explain and score SAE features (``headscope explain features`` / ``explain score-features``).

Inputs: the SAE ``RUN/sae/<name>/`` and its dashboards (``dashboards/index.json`` + pages, see
:mod:`headscope.sae.dashboards`): per alive feature, its max-activating held-out contexts (``examples``)
and a uniform random sample of the held-out tokens where it fires (``quantiles``).

:func:`run_feature_contexts` (inside :func:`run_explain_features`) draws ``features`` alive features at
random (seeded). **Leak-free by document**: the held-out documents are split at random (seeded) into an
explain half and a test half (:class:`_Docs`); every context belongs to the half its documents lie in
(one straddling both is used by neither), so no scored context shares a document, let alone a token,
with a shown one. Per feature:

* **explain set** (explain documents): the ``n_explain`` max-activating contexts (activating tokens
  highlighted) and ``n_explain`` random held-out windows (highlighted where the feature fires);
* **test set** (test documents): up to ``n_test`` activating contexts from the dashboards' random sample
  (all activation levels, not the top examples); as negatives, for each of them a **matched** window of
  the same document (not overlapping it) where the feature is zero on every token — so a judge that
  detects the *document* gains nothing — plus ``n_test`` **random** test-document windows where the
  feature is zero (detection); and each activating context twice for fuzzing — its real activating
  tokens marked, and as many random non-activating tokens of the same context marked.

Every scored item records its stream ``span``, its ``doc`` and (detection) ``kind`` (positive / matched /
random) in ``detection_meta`` / ``fuzzing_meta``, and each feature the spans it showed (``shown_spans``),
so the scorer's confidence intervals are clustered by document and the separation can be checked.
``contexts.json`` also records how many documents each part drew from (``documents``).

Random windows (:func:`_window_plan`): about ``windows`` / 16 held-out sequences drawn at random, up to 16
distinct centres each drawn uniformly (never position 0, the BOS), each the dashboard's window (``ctx_left``
tokens before, ``ctx_right`` after). Each sequence runs through the model only up to the last token its
windows need, then the SAE; the sequences of the test positives run in the same pass (matched negatives).

Files (``RUN/explain/features/<sae>/``): ``contexts.json``, then ``explanations_<backend>.json`` and
``scores_<explanations>_by_<scorer>.json`` (+ ``.png``).
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..options import check as _check
from ..runs import RunDir, read_json, write_json
from .contexts import Context, ExplainContextsRequest, feature_backend
from .dfa_rules import family as dfa_family
from .options import FeatureDryRunOptions, FeatureExplainOptions, FeatureScoreOptions, backend_name
from .results import FeatureExplainResult, FeatureScoresResult
from .scorers import score_units


def cmd_features_dry_run(model, run: RunDir, opts: FeatureDryRunOptions) -> int:
    """``headscope explain features-dry-run``: the requests as JSONL, with a rough token estimate."""
    from .prompts import estimate_tokens
    dry = Path(opts.jsonl)
    if dry.exists():
        dry.unlink()
    be = make_feature_backend(opts, run, model, dry_run=dry, backend="openai")
    _, _, reqs = _feature_requests(model, run, opts, progress=False)
    be.explain_contexts(reqs)    # the dry-run client appends each request to the JSONL and answers ""
    lines = [json.loads(x) for x in dry.read_text().splitlines()] if dry.is_file() else []
    toks = sum(estimate_tokens(x["body"]["messages"]) for x in lines)
    print(f"dry run: {len(reqs)} feature explanation requests written to {dry} "
          f"(≈{toks} input tokens, ≤{len(lines) * be.backend.max_tokens} output tokens)")
    return 0


def make_feature_backend(opts, run: RunDir | None = None, model=None, dry_run: Path | None = None,
                         backend: str | None = None):
    """The context explainer/judge named by ``backend`` (default ``opts.backend``), with the endpoint /
    local-model settings of ``opts`` (an :class:`LLMOptions`)."""
    name = backend_name(backend or opts.backend)
    if name == "statistical":
        from .token_stats import TokenStatExplainer
        return TokenStatExplainer()
    if name == "dfa":
        from .dfa_rules import DFAExplainer
        return DFAExplainer()
    from .stages import make_backend
    return feature_backend(make_backend(name, opts, run, model, dry_run=dry_run))


def sae_name(run: RunDir, name: str = "") -> str:
    """The SAE to read: ``name``, or the only SAE with dashboards in the run."""
    root = run / "sae"
    have = sorted(p.parent.parent.name for p in root.glob("*/dashboards/index.json")) if root.is_dir() else []
    if name:
        _check(name in have, f"no dashboards for SAE '{name}' in {root} (have: {', '.join(have) or 'none'}); "
                             f"run `headscope sae dashboards --name {name}` first")
        return name
    _check(len(have) > 0, f"no SAE dashboards in {root}: run `headscope sae train` and `headscope sae dashboards` first")
    _check(len(have) == 1, f"several SAEs have dashboards ({', '.join(have)}): choose one with --sae")
    return have[0]


def features_dir(run: RunDir, sae: str) -> Path:
    return run / "explain" / "features" / sae


def _records(folder: Path) -> tuple[dict, dict[int, dict]]:
    index = read_json(folder / "dashboards/index.json")
    recs: dict[int, dict] = {}
    for i in range(int(index["pages"])):
        for f, r in read_json(folder / f"dashboards/page_{i:03d}.json")["features"].items():
            recs[int(f)] = r
    return index, recs


WINDOWS_PER_SEQUENCE = 16
"""Random held-out windows drawn per held-out sequence (at most; more when the split is small)."""


def _window_plan(n_seq: int, S: int, n: int, left: int, right: int, seed: int,
                 per_seq: int = WINDOWS_PER_SEQUENCE) -> list[tuple[int, int]]:
    """Where ``n`` random held-out windows lie, as (sequence, centre position): about n / per_seq
    sequences drawn uniformly from the ``n_seq`` held-out sequences of length S, each holding about
    ``per_seq`` windows (more when the split has too few sequences) at distinct centres drawn uniformly
    among left+1 … S−right−1 (never the BOS at 0). In random order; seeded. Which windows the explainer
    sees and which are test negatives is decided by their documents (:func:`_doc_groups`)."""
    lo, hi = left + 1, S - right                                   # centres lo … hi−1
    _check(n_seq >= 2 and hi - lo >= 1, "the held-out split is too small for random windows")
    k = min(n_seq, max(2, -(-n // per_seq)))
    rng = random.Random(seed)
    seqs = rng.sample(range(n_seq), k)
    base, extra = divmod(n, k)
    _check(base + (extra > 0) <= hi - lo,
           f"the held-out split is too small for {n} random windows ({n_seq} sequences with {hi - lo} centre "
           f"positions each): ask for fewer --windows")
    plan = [(s, p) for i, s in enumerate(seqs) for p in rng.sample(range(lo, hi), base + (i < extra))]
    rng.shuffle(plan)
    return plan


@torch.no_grad()
def _encode_sequences(model, sae, corpus, need: dict[int, int], progress: bool, batch_size: int = 8):
    """{sequence: (token strings [T], SAE activations [T, F])} of held-out sequences ``need`` = {sequence:
    T} (tokens 0 … T−1; the model is causal, so the rest is never run); the activation at position 0 (the
    BOS) is set to 0. Sequences are sorted by T and batched, each batch truncated to its longest."""
    from ..capture import capture
    seqs = sorted(need, key=lambda s: (need[s], s))
    L = sae.cfg.layer
    out = {}
    for b in tqdm(range(0, len(seqs), batch_size), desc="held-out contexts", disable=not progress,
                  file=sys.stderr, unit=" batch"):
        chunk = seqs[b:b + batch_size]
        T = max(need[s] for s in chunk)
        ids = torch.stack([corpus.sequence("heldout", s)[:T] for s in chunk]).to(model.device)
        z = capture(model, ids, layers=[L], what=("z",), stop_after=L)["z"][L]
        acts = sae.encode(z.reshape(len(chunk) * T, -1).float()).reshape(len(chunk), T, -1).cpu()
        acts[:, 0] = 0.0
        for j, s in enumerate(chunk):
            out[s] = (model.token_str(ids[j, :need[s]].tolist()), acts[j, :need[s]].clone())
    return out


def _random_windows(model, sae, corpus, n: int, left: int, right: int, seed: int, progress: bool,
                    per_seq: int = WINDOWS_PER_SEQUENCE, extra: dict[int, int] | None = None):
    """``n`` random held-out windows where :func:`_window_plan` puts them: (plan [(sequence, centre)],
    [(tokens [W], SAE activations [W, F])] in plan order, the encoded sequences {sequence: (tokens,
    acts)}), W = left + 1 + right. ``extra`` {sequence: T}: more sequences to encode (in the same pass)."""
    plan = _window_plan(corpus.n_sequences("heldout"), corpus.seq_len, n, left, right, seed, per_seq)
    need = dict(extra or {})
    for s, p in plan:
        need[s] = max(need.get(s, 0), p + right + 1)
    enc = _encode_sequences(model, sae, corpus, need, progress)
    wins = [(enc[s][0][p - left:p + right + 1], enc[s][1][p - left:p + right + 1]) for s, p in plan]
    return plan, wins, enc


class _Docs:
    """Document bookkeeping of held-out contexts: the stream span of a context and the group of its
    documents. Held-out documents are split at random (seeded) into an *explain* half, whose contexts
    the explainer may see, and a *test* half, whose contexts are scored: no test context shares a
    document — so no token — with a shown one. A context whose tokens straddle the two halves is used
    by neither."""

    def __init__(self, corpus, seed: int):
        self.corpus, self.W = corpus, corpus.seq_len - 1
        n = max(1, corpus.n_documents("heldout"))
        rng = np.random.default_rng([seed, 21])
        self.is_test = np.zeros(n + 1, dtype=bool)
        self.is_test[rng.permutation(n)[: n // 2]] = True

    def span(self, seq: int, lo: int, hi: int) -> tuple[int, int]:
        """Stream offsets [first, last] of the body tokens at positions lo … hi of held-out sequence
        ``seq`` (position 0, the BOS, is no stream token; position p ≥ 1 is offset seq·W + p − 1)."""
        return seq * self.W + max(lo, 1) - 1, seq * self.W + hi - 1

    def docs(self, span: tuple[int, int]) -> tuple[int, int]:
        a, b = self.corpus.document_of("heldout", list(span)).tolist()
        return int(a), int(b)

    def group(self, span: tuple[int, int]) -> str | None:
        """'explain', 'test' or None (the span's documents lie in both halves)."""
        a, b = self.docs(span)
        g = self.is_test[a:b + 1]
        return "test" if g.all() else ("explain" if not g.any() else None)


@torch.no_grad()
def _example_dfa(model, sae, corpus, wanted: dict[int, list[tuple[int, int]]], progress: bool,
                 batch_size: int = 8, top: int = 3) -> dict[tuple[int, int, int], dict]:
    """Where each shown max-activating example reads from: for ``wanted`` = {held-out sequence: [(feature,
    destination position)]}, the ``top`` source positions of largest DFA (summed over heads) of the
    feature at that destination, as {(feature, sequence, position): {"sources": [{"dist", "token",
    "induction", "dfa"}]}} (``dist`` = destination − source; ``induction``: the token before the source
    equals the destination token, i.e. the source follows an earlier copy of the current token)."""
    from ..capture import capture, eager_attention
    from ..sae.attribution import dfa_from_capture
    L = sae.cfg.layer
    seqs = sorted(wanted, key=lambda s: max(p for _, p in wanted[s]))
    out = {}
    for b in tqdm(range(0, len(seqs), batch_size), desc="DFA of shown examples", disable=not progress,
                  file=sys.stderr, unit=" batch"):
        chunk = seqs[b:b + batch_size]
        T = max(p for s in chunk for _, p in wanted[s]) + 1
        ids = torch.stack([corpus.sequence("heldout", s)[:T] for s in chunk]).to(model.device)
        with eager_attention(model):
            cap = capture(model, ids, layers=[L], what=("pattern", "v"), stop_after=L)
        for j, s in enumerate(chunk):
            feats = sorted({f for f, _ in wanted[s]})
            pat, proj = dfa_from_capture(model, sae, cap["pattern"][L][j:j + 1], cap["v"][L][j:j + 1], feats)
            toks = model.token_str(ids[j].tolist())
            for f, p in wanted[s]:
                k = feats.index(f)
                d = (pat[0, :, p, :] * proj[0, :, :, k].T).sum(0).cpu()          # [T] per source
                d[0] = -float("inf")                                               # the BOS is no source
                d[p + 1:] = -float("inf")
                src = d.topk(min(top, p)).indices.tolist()
                out[f, s, p] = {"sources": [{"dist": p - q, "token": toks[q], "dfa": round(float(d[q]), 4),
                                             "induction": bool(q >= 2 and toks[q - 1] == toks[p])} for q in src]}
    return out


def _fuzzed(ctx: Context, rng: random.Random) -> Context | None:
    """The same context with as many random non-activating tokens marked as it has activating ones."""
    real = ctx.marked()
    others = [i for i, a in enumerate(ctx.acts) if a <= 0]
    if not real or len(others) < len(real):
        return None
    return Context(ctx.tokens, ctx.acts, sorted(rng.sample(others, len(real))))


def _matched_negative(docs: _Docs, enc: dict, f: int, seq: int, pos: int, left: int, right: int, span_pos,
                      rng: random.Random):
    """A window of held-out sequence ``seq`` from the same document as the positive at ``pos`` (its
    span ``span_pos``), not overlapping it, where feature ``f`` is zero on every token: (Context, span)
    or None when the sequence holds no such window."""
    toks, acts = enc[seq]
    T = len(toks)
    doc = docs.docs(span_pos)[0]
    cands = []
    for c in range(left + 1, T - right):
        sp = docs.span(seq, c - left, c + right)
        if sp[1] >= span_pos[0] and sp[0] <= span_pos[1]:
            continue                                                     # overlaps the positive
        if docs.docs(sp) != (doc, doc) or float(acts[c - left:c + right + 1, f].max()) > 0:
            continue
        cands.append(c)
    if not cands:
        return None
    c = rng.choice(cands)
    return Context(toks[c - left:c + right + 1], acts[c - left:c + right + 1, f].tolist()), docs.span(seq, c - left, c + right)


def run_feature_contexts(model, run: RunDir, opts: FeatureExplainOptions, progress: bool = True) -> dict:
    """Write ``explain/features/<sae>/contexts.json`` (see the module docstring); returns it."""
    from ..data import TokenCorpus
    from ..sae.io import load_sae
    name = sae_name(run, opts.sae)
    folder = run / "sae" / name
    index, recs = _records(folder)
    alive = sorted(recs)
    _check(len(alive) >= 2, f"SAE '{name}' has {len(alive)} alive feature(s) in its dashboards: a shuffled-"
                            "explanation baseline needs at least two")
    order = list(alive)
    random.Random(opts.seed).shuffle(order)  # a prefix: fewer features are a subset of more
    chosen = sorted(order[:opts.features]) if 0 < opts.features < len(alive) else alive
    sae = load_sae(folder, model).to(model.device)
    tj = folder / "train.json"
    cfg = read_json(tj)["config"] if tj.is_file() else {}
    corpus = TokenCorpus(model, cfg.get("corpus", "default"), seq_len=cfg.get("seq_len", sae.cfg.context_size),
                         progress=progress)
    S = corpus.seq_len
    widths = [(e["index"], len(e["context"]) - e["index"] - 1) for r in recs.values() for e in r["examples"]]
    left, right = max(w[0] for w in widths), max(w[1] for w in widths)
    docs = _Docs(corpus, opts.seed)

    def ex_span(e):
        lo = e["pos"] - e["index"]
        return docs.span(e["seq"], lo, lo + len(e["context"]) - 1)
    # test positives: the dashboards' uniform sample of firing tokens, in test documents only
    pos_by_f = {}
    for f in chosen:
        r = recs[f]
        top_keys = {(e["seq"], e["pos"]) for e in r["examples"]}
        samples = [e for q in r["quantiles"] for e in q["examples"] if (e["seq"], e["pos"]) not in top_keys]
        samples = [(e, ex_span(e)) for e in samples]
        rf = random.Random(f"{opts.seed}:{f}")   # a feature's contexts do not depend on which others were drawn
        samples = [x for x in samples if docs.group(x[1]) == "test"]
        rf.shuffle(samples)
        pos_by_f[f] = samples[:opts.n_test]
    extra = {e["seq"]: S for ps in pos_by_f.values() for e, _ in ps}      # their sequences, for matched negatives
    plan, wins, enc = _random_windows(model, sae, corpus, opts.windows, left, right, opts.seed, progress,
                                      extra=extra)
    groups = {"explain": [], "test": []}
    for (s, p), (t, a) in zip(plan, wins):
        sp = docs.span(s, p - left, p + right)
        g = docs.group(sp)
        if g is not None:
            groups[g].append((t, a, sp))
    top_by_f = {f: [(e, sp) for e, sp in ((e, ex_span(e)) for e in recs[f]["examples"])
                    if docs.group(sp) == "explain"][:opts.n_explain] for f in chosen}
    wanted: dict[int, list[tuple[int, int]]] = {}
    for f, top in top_by_f.items():
        for e, _ in top:
            wanted.setdefault(e["seq"], []).append((f, e["pos"]))
    dfa = _example_dfa(model, sae, corpus, wanted, progress)
    out, skipped = {}, 0
    for f in chosen:
        r = recs[f]
        rf = random.Random(f"{opts.seed}:{f}:sets")
        top = top_by_f[f]
        if not top or not pos_by_f[f]:
            skipped += 1       # nothing to show, or nothing to test, from disjoint documents
            continue
        active = [Context(e["context"], e["acts"]) for e, _ in top]
        shown_w = rf.sample(groups["explain"], min(opts.n_explain, len(groups["explain"])))
        shown = [Context(t, a[:, f].tolist()) for t, a, _ in shown_w]
        pos = [(Context(e["context"], e["acts"]), sp, docs.docs(sp)[0]) for e, sp in pos_by_f[f]]
        matched = []
        for (e, sp) in pos_by_f[f]:
            m = _matched_negative(docs, enc, f, e["seq"], e["pos"], left, right, sp, rf)
            if m is not None:
                matched.append((m[0], m[1], docs.docs(m[1])[0]))
        zero = [(t, a[:, f], sp) for t, a, sp in groups["test"] if float(a[:, f].max()) <= 0]
        rand = [(Context(t, a.tolist()), sp, docs.docs(sp)[0]) for t, a, sp in rf.sample(zero, min(opts.n_test, len(zero)))]
        det = [(c, True, sp, d, "positive") for c, sp, d in pos] + \
              [(c, False, sp, d, "matched") for c, sp, d in matched] + \
              [(c, False, sp, d, "random") for c, sp, d in rand]
        fuzz = []
        for c, sp, d in pos:
            fz = _fuzzed(c, rf)
            if fz is not None:
                fuzz += [(Context(c.tokens, c.acts, c.marked()), True, sp, d), (fz, False, sp, d)]
        recs_dfa = [dfa[f, e["seq"], e["pos"]] for e, _ in top]
        fam, ev = dfa_family(recs_dfa)
        out[str(f)] = {"explain": {"active": [c.to_json() for c in active], "random": [c.to_json() for c in shown],
                                   "dfa": recs_dfa},
                       "family": fam, "family_evidence": ev,
                       "shown_spans": [list(sp) for _, sp in top] + [list(sp) for *_, sp in shown_w],
                       "detection": [(c.to_json(), t) for c, t, *_ in det],
                       "detection_meta": [{"span": list(sp), "doc": d, "kind": k} for _, _, sp, d, k in det],
                       "fuzzing": [(c.to_json(), t) for c, t, *_ in fuzz],
                       "fuzzing_meta": [{"span": list(sp), "doc": d} for *_, sp, d in fuzz],
                       "density": r.get("density"), "max_act": r.get("max_act")}
    n_docs = len(docs.is_test) - 1
    data = {"sae": name, "layer": index.get("layer"), "options": asdict(opts), "window": [left, right],
            "alive": len(alive), "skipped": skipped,
            "documents": {"heldout": n_docs, "test": int(docs.is_test[:n_docs].sum()),
                          "explain": int(n_docs - docs.is_test[:n_docs].sum()),
                          "random_windows": len({docs.docs(sp)[0] for g in groups.values() for *_, sp in g}),
                          "test_positives": len({m["doc"] for v in out.values() for m in v["detection_meta"]
                                                 if m["kind"] == "positive"})},
            "features": out}
    write_json(features_dir(run, name) / "contexts.json", data)
    return data


def _feature_requests(model, run: RunDir, opts: FeatureExplainOptions, progress: bool = True):
    """The contexts (:func:`run_feature_contexts`, written) and one explanation request per feature:
    ``(ctx, feature ids, requests)``."""
    ctx = run_feature_contexts(model, run, opts, progress)
    feats = list(ctx["features"])
    reqs = [ExplainContextsRequest([Context.from_json(c) for c in ctx["features"][f]["explain"]["active"]],
                                   [Context.from_json(c) for c in ctx["features"][f]["explain"]["random"]],
                                   ctx["features"][f]["explain"].get("dfa"))
            for f in feats]
    return ctx, feats, reqs


def run_explain_features(model, run: RunDir, opts: FeatureExplainOptions, progress: bool = True,
                         backend=None, chunk: int = 16) -> FeatureExplainResult:
    """Contexts (:func:`run_feature_contexts`), then one explanation per feature, written to
    ``explain/features/<sae>/explanations_<backend>.json``: ``{"sae", "backend": config, "options",
    "features": {f: {"explanation", "n_active", "n_random"}}}``. ``backend``: a ready back-end (tests, a
    client with custom concurrency) instead of ``opts.backend``."""
    backend = feature_backend(backend) if backend is not None else make_feature_backend(opts, run, model)
    ctx, feats, reqs = _feature_requests(model, run, opts, progress)
    texts: list[str] = []
    bar = tqdm(total=len(reqs), desc=f"explaining features ({backend.name})", unit=" feature",
               disable=not progress, file=sys.stderr)
    for s in range(0, len(reqs), chunk):
        texts += backend.explain_contexts(reqs[s:s + chunk])
        bar.update(len(reqs[s:s + chunk]))
    bar.close()
    out = {f: {"explanation": t, "family": ctx["features"][f].get("family"), "n_active": len(r.active),
               "n_random": len(r.random)} for f, t, r in zip(feats, texts, reqs)}
    write_json(features_dir(run, ctx["sae"]) / f"explanations_{backend.name}.json",
               {"sae": ctx["sae"], "layer": ctx["layer"], "backend": backend.config(), "options": asdict(opts),
                "features": out})
    fams: dict[str, int] = {}
    for v in out.values():
        fams[v["family"]] = fams.get(v["family"], 0) + 1
    return FeatureExplainResult(sae=ctx["sae"], features=len(out), backend=backend.name,
                                skipped=ctx.get("skipped", 0), families=fams)


def run_score_features(model, run: RunDir, opts: FeatureScoreOptions, progress: bool = True,
                       backend=None) -> FeatureScoresResult:
    """Judge each explained feature's held-out contexts with its own and a shuffled explanation; writes
    ``scores_<explanations>_by_<judge>.json``: ``{"sae", "scorer", "explanations", "probabilities",
    "features": [{id, detection: {...}, fuzzing: {...}}], "summary": {kind: ...}}`` (see
    :func:`headscope.explain.scorers.score_units`) and a histogram ``.png`` beside it."""
    backend = feature_backend(backend) if backend is not None else make_feature_backend(opts, run, model)
    name = sae_name(run, opts.sae)
    d = features_dir(run, name)
    ex_name = backend_name(opts.explanations) if opts.explanations else backend.name
    ex_path = d / f"explanations_{ex_name}.json"
    _check(ex_path.is_file(), f"missing {ex_path}: run `headscope explain features --backend {ex_name}` first")
    ctx = read_json(d / "contexts.json")
    exj = read_json(ex_path)
    same = ("n_explain", "n_test", "windows", "seed")
    diff = [k for k in same if exj.get("options", {}).get(k) != ctx["options"].get(k)]
    _check(not diff, f"{ex_path.name} was made from other contexts than contexts.json ({', '.join(diff)} differ): "
                     f"rerun `headscope explain features --backend {ex_name}` with the options of the last run")
    ex = exj["features"]
    units = []
    for f, e in ex.items():
        c = ctx["features"].get(f)
        if c is None:  # explained in an earlier run that drew other features
            continue
        unit = {"id": f, "explanation": e["explanation"],
                "items": {k: [(Context.from_json(x), bool(t)) for x, t in c[k]] for k in opts.scorers}}
        if all(f"{k}_meta" in c for k in opts.scorers):
            unit["clusters"] = {k: [m["doc"] for m in c[f"{k}_meta"]] for k in opts.scorers}
            unit["kinds"] = [m["kind"] for m in c.get("detection_meta", [])]
        units.append(unit)
    _check(len(units) >= 2, f"{len(units)} explained feature(s) in {ex_path}: scoring needs at least two")
    n = sum(2 * len(u["items"][k]) for u in units for k in opts.scorers)
    bar = tqdm(total=n, desc=f"scoring features ({backend.name})", unit=" judgement", disable=not progress,
               file=sys.stderr)
    res = score_units(backend.judge, units, tuple(opts.scorers), seed=opts.seed, progress=bar.update)
    bar.close()
    if "detection" in opts.scorers and all(u.get("kinds") for u in units):
        res["summary"]["detection"]["yes_rate"] = _yes_rates(units, res["units"])
    path = d / f"scores_{ex_name}_by_{backend.name}.json"
    out = {"sae": name, "scorer": backend.config(), "explanations": ex_name, "options": asdict(opts),
           "probabilities": getattr(backend, "probabilities", "unknown"), "features": res["units"],
           "summary": res["summary"]}
    _histogram(path.with_suffix(".png"), res["units"], opts.scorers, f"SAE {name}: {ex_name} explanations, "
               f"{backend.name} judge")
    write_json(path, out)
    return FeatureScoresResult(sae=name, probabilities=out["probabilities"], **res["summary"])


def _yes_rates(units: list[dict], rows: list[dict]) -> dict:
    """How often the judge says yes with the real explanation, per item kind (positive; matched negative =
    same document as a positive; random negative): a judge that detects the document, not the feature,
    says yes on matched negatives more than on random ones."""
    got: dict[str, list[bool]] = {}
    for u, r in zip(units, rows):
        for k, p in zip(u["kinds"], r["detection"]["probs"]):
            got.setdefault(k, []).append(p is not None and p >= 0.5)
    return {k: {"rate": float(np.mean(v)), "n": len(v)} for k, v in got.items()}


def _histogram(path: Path, rows: list[dict], kinds, title: str) -> None:
    from ..neurons.plots import histogram_png
    for k in kinds:
        real = [r[k]["balanced_accuracy"] for r in rows if r[k]["balanced_accuracy"] is not None]
        shuf = [r[k]["shuffled_balanced_accuracy"] for r in rows if r[k]["shuffled_balanced_accuracy"] is not None]
        histogram_png(path.with_name(path.stem + f"_{k}.png"), {"explanation": real, "shuffled explanation": shuf},
                      f"{title} ({k})", "balanced accuracy")
