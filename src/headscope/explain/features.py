"""Explain and score SAE features (``headscope explain features`` / ``explain score-features``).

Inputs: the SAE ``RUN/sae/<name>/`` and its dashboards (``dashboards/index.json`` + pages, see
:mod:`headscope.sae.dashboards`): per alive feature, its max-activating held-out contexts (``examples``)
and a uniform random sample of the held-out tokens where it fires (``quantiles``).

:func:`run_feature_contexts` (inside :func:`run_explain_features`) draws ``features`` alive features at
random (seeded) and, per feature:

* **explain set**: the ``n_explain`` max-activating contexts (activating tokens highlighted) and
  ``n_explain`` random held-out windows (highlighted where the feature fires, usually nowhere);
* **test set**, disjoint from it: up to ``n_test`` activating contexts from the random sample (all
  activation levels, not the top examples) and ``n_test`` random held-out windows where the feature is
  zero on every token (detection), and each activating test context twice for fuzzing — its real
  activating tokens marked, and as many random non-activating tokens of the same context marked.

Random windows (:func:`_window_plan`): about ``windows`` / 16 held-out sequences drawn at random, up to 16
distinct centres each drawn uniformly (never position 0, the BOS), each the dashboard's window (``ctx_left``
tokens before, ``ctx_right`` after); the explain and the test half come from disjoint sequences. Each
sequence runs through the model only up to the last token its windows need, then the SAE.

Files (``RUN/explain/features/<sae>/``): ``contexts.json``, then ``explanations_<backend>.json`` and
``scores_<explanations>_by_<scorer>.json`` (+ ``.png``).
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from ..options import check as _check
from ..runs import RunDir, read_json, write_json
from .contexts import Context, ExplainContextsRequest, feature_backend
from .options import FeatureDryRunOptions, FeatureExplainOptions, FeatureScoreOptions, backend_name
from .scorers import score_units


def cmd_features_dry_run(model, run: RunDir, opts: FeatureDryRunOptions) -> int:
    """``headscope explain features-dry-run``: the requests as JSONL, with a rough token estimate."""
    from .prompts import estimate_tokens
    dry = Path(opts.jsonl)
    if dry.exists():
        dry.unlink()
    be = make_feature_backend(opts, run, model, dry_run=dry, backend="openai")
    res = run_explain_features(model, run, opts, progress=False, backend=be)
    lines = [json.loads(x) for x in dry.read_text().splitlines()] if dry.is_file() else []
    toks = sum(estimate_tokens(x["body"]["messages"]) for x in lines)
    print(f"dry run: {res['explain_requests']} feature explanation requests written to {dry} "
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
    from .stages import make_backend
    dev = str(getattr(model, "device", "cpu"))
    return feature_backend(make_backend(name, run, model, **opts.client_kwargs(dev, dry_run)))


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
                 per_seq: int = WINDOWS_PER_SEQUENCE) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Where ``n`` random held-out windows lie, as (explain, test) lists of (sequence, centre position):
    n // 2 windows for the explain half, the rest for the test half, the two halves from disjoint sets of
    sequences (no test window overlaps a shown one). About n / per_seq sequences are drawn uniformly from
    the ``n_seq`` held-out sequences of length S, each holds about ``per_seq`` windows (more when the
    split has too few sequences) at distinct centres drawn uniformly among left+1 … S−right−1 (never the
    BOS at 0). Each list is in random order; seeded."""
    lo, hi = left + 1, S - right                                   # centres lo … hi−1
    _check(n_seq >= 2 and hi - lo >= 1, "the held-out split is too small for random windows")
    halves = (n // 2, n - n // 2)
    k = min(n_seq, sum(max(1, -(-h // per_seq)) for h in halves))
    k_a = max(1, min(k - 1, round(k * halves[0] / n)))
    rng = random.Random(seed)
    seqs = rng.sample(range(n_seq), k)
    plans = []
    for h, group in zip(halves, (seqs[:k_a], seqs[k_a:])):
        base, extra = divmod(h, len(group))
        _check(base + (extra > 0) <= hi - lo,
               f"the held-out split is too small for {n} random windows ({n_seq} sequences with {hi - lo} centre "
               f"positions each, split between the explain and test halves): ask for fewer --windows")
        plan = [(s, p) for i, s in enumerate(group) for p in rng.sample(range(lo, hi), base + (i < extra))]
        rng.shuffle(plan)
        plans.append(plan)
    return plans[0], plans[1]


@torch.no_grad()
def _random_windows(model, sae, corpus, n: int, left: int, right: int, seed: int, progress: bool,
                    per_seq: int = WINDOWS_PER_SEQUENCE, batch_size: int = 8):
    """``n`` random held-out windows where :func:`_window_plan` puts them, as (explain, test) lists of
    (tokens [W], SAE activations [W, F]), W = left + 1 + right; the activation at position 0 (the BOS)
    is set to 0. The model is causal, so each sequence runs only up to the last token its windows need:
    sequences are sorted by that length and batched, each batch truncated to its longest."""
    from ..capture import capture
    S = corpus.seq_len
    plans = _window_plan(corpus.n_sequences("heldout"), S, n, left, right, seed, per_seq)
    by_seq: dict[int, list[int]] = {}
    for s, p in plans[0] + plans[1]:
        by_seq.setdefault(s, []).append(p)
    need = {s: max(ps) + right + 1 for s, ps in by_seq.items()}  # tokens 0 … need−1
    seqs = sorted(by_seq, key=lambda s: (need[s], s))
    L = sae.cfg.layer
    got: dict[tuple[int, int], tuple[list[str], torch.Tensor]] = {}
    for b in tqdm(range(0, len(seqs), batch_size), desc="random held-out windows", disable=not progress,
                  file=sys.stderr, unit=" batch"):
        chunk = seqs[b:b + batch_size]
        T = max(need[s] for s in chunk)
        ids = torch.stack([corpus.sequence("heldout", s)[:T] for s in chunk]).to(model.device)
        z = capture(model, ids, layers=[L], what=("z",), stop_after=L)["z"][L]
        acts = sae.encode(z.reshape(len(chunk) * T, -1).float()).reshape(len(chunk), T, -1).cpu()
        acts[:, 0] = 0.0
        for j, s in enumerate(chunk):
            toks = model.token_str(ids[j].tolist())
            for p in by_seq[s]:
                got[s, p] = (toks[p - left:p + right + 1], acts[j, p - left:p + right + 1].clone())
    return [got[key] for key in plans[0]], [got[key] for key in plans[1]]


def _fuzzed(ctx: Context, rng: random.Random) -> Context | None:
    """The same context with as many random non-activating tokens marked as it has activating ones."""
    real = ctx.marked()
    others = [i for i, a in enumerate(ctx.acts) if a <= 0]
    if not real or len(others) < len(real):
        return None
    return Context(ctx.tokens, ctx.acts, sorted(rng.sample(others, len(real))))


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
    widths = [(e["index"], len(e["context"]) - e["index"] - 1) for r in recs.values() for e in r["examples"]]
    left, right = max(w[0] for w in widths), max(w[1] for w in widths)
    explain_wins, test_wins = _random_windows(model, sae, corpus, opts.windows, left, right, opts.seed, progress)
    half = len(explain_wins)
    out = {}
    for f in chosen:
        r = recs[f]
        rf = random.Random(f"{opts.seed}:{f}")  # a feature's contexts do not depend on which others were drawn
        active = [Context(e["context"], e["acts"]) for e in r["examples"][:opts.n_explain]]
        top_keys = {(e["seq"], e["pos"]) for e in r["examples"][:opts.n_explain]}
        shown = [Context(t, a[:, f].tolist()) for t, a in rf.sample(explain_wins, min(opts.n_explain, half))]
        samples = [e for q in r["quantiles"] for e in q["examples"] if (e["seq"], e["pos"]) not in top_keys]
        rf.shuffle(samples)
        pos = [Context(e["context"], e["acts"]) for e in samples[:opts.n_test]]
        zero = [(t, a[:, f]) for t, a in test_wins if float(a[:, f].max()) <= 0]
        neg = [Context(t, a.tolist()) for t, a in zero[:opts.n_test]]
        fuzz = []
        for c in pos:
            fz = _fuzzed(c, rf)
            if fz is not None:
                fuzz += [(Context(c.tokens, c.acts, c.marked()), True), (fz, False)]
        out[str(f)] = {"explain": {"active": [c.to_json() for c in active], "random": [c.to_json() for c in shown]},
                       "detection": [(c.to_json(), True) for c in pos] + [(c.to_json(), False) for c in neg],
                       "fuzzing": [(c.to_json(), t) for c, t in fuzz],
                       "density": r.get("density"), "max_act": r.get("max_act")}
    data = {"sae": name, "layer": index.get("layer"), "options": asdict(opts), "window": [left, right],
            "alive": len(alive), "features": out}
    write_json(features_dir(run, name) / "contexts.json", data)
    return data


def run_explain_features(model, run: RunDir, opts: FeatureExplainOptions, progress: bool = True,
                         backend=None, chunk: int = 16) -> dict:
    """Contexts (:func:`run_feature_contexts`), then one explanation per feature, written to
    ``explain/features/<sae>/explanations_<backend>.json``: ``{"sae", "backend": config, "options",
    "features": {f: {"explanation", "n_active", "n_random"}}}``. ``backend``: a ready back-end (tests, a
    client with custom concurrency) instead of ``opts.backend``. With a dry-run endpoint, writes the
    requests JSONL and returns their count instead."""
    backend = feature_backend(backend) if backend is not None else make_feature_backend(opts, run, model)
    ctx = run_feature_contexts(model, run, opts, progress)
    feats = list(ctx["features"])
    reqs = [ExplainContextsRequest([Context.from_json(c) for c in ctx["features"][f]["explain"]["active"]],
                                   [Context.from_json(c) for c in ctx["features"][f]["explain"]["random"]])
            for f in feats]
    client = getattr(getattr(backend, "backend", None), "client", None)
    if client is not None and client.dry_run is not None:
        backend.explain_contexts(reqs)
        return {"dry_run": str(client.dry_run), "explain_requests": len(reqs)}
    texts: list[str] = []
    bar = tqdm(total=len(reqs), desc=f"explaining features ({backend.name})", unit=" feature",
               disable=not progress, file=sys.stderr)
    for s in range(0, len(reqs), chunk):
        texts += backend.explain_contexts(reqs[s:s + chunk])
        bar.update(len(reqs[s:s + chunk]))
    bar.close()
    out = {f: {"explanation": t, "n_active": len(r.active), "n_random": len(r.random)}
           for f, t, r in zip(feats, texts, reqs)}
    write_json(features_dir(run, ctx["sae"]) / f"explanations_{backend.name}.json",
               {"sae": ctx["sae"], "layer": ctx["layer"], "backend": backend.config(), "options": asdict(opts),
                "features": out})
    return {"sae": ctx["sae"], "features": len(out), "backend": backend.name}


def run_score_features(model, run: RunDir, opts: FeatureScoreOptions, progress: bool = True, backend=None) -> dict:
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
        units.append({"id": f, "explanation": e["explanation"],
                      "items": {k: [(Context.from_json(x), bool(t)) for x, t in c[k]] for k in opts.scorers}})
    _check(len(units) >= 2, f"{len(units)} explained feature(s) in {ex_path}: scoring needs at least two")
    n = sum(2 * len(u["items"][k]) for u in units for k in opts.scorers)
    bar = tqdm(total=n, desc=f"scoring features ({backend.name})", unit=" judgement", disable=not progress,
               file=sys.stderr)
    res = score_units(backend.judge, units, tuple(opts.scorers), seed=opts.seed, progress=bar.update)
    bar.close()
    path = d / f"scores_{ex_name}_by_{backend.name}.json"
    out = {"sae": name, "scorer": backend.config(), "explanations": ex_name, "options": asdict(opts),
           "probabilities": getattr(backend, "probabilities", "unknown"), "features": res["units"],
           "summary": res["summary"]}
    _histogram(path.with_suffix(".png"), res["units"], opts.scorers, f"SAE {name}: {ex_name} explanations, "
               f"{backend.name} judge")
    write_json(path, out)
    return {"sae": name, "probabilities": out["probabilities"], **res["summary"]}


def _histogram(path: Path, rows: list[dict], kinds, title: str) -> None:
    from ..neurons.plots import histogram_png
    for k in kinds:
        real = [r[k]["balanced_accuracy"] for r in rows if r[k]["balanced_accuracy"] is not None]
        shuf = [r[k]["shuffled_balanced_accuracy"] for r in rows if r[k]["shuffled_balanced_accuracy"] is not None]
        histogram_png(path.with_name(path.stem + f"_{k}.png"), {"explanation": real, "shuffled explanation": shuf},
                      f"{title} ({k})", "balanced accuracy")
