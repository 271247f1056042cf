"""The offline attention-source explainer (``dfa``): families from DFA, token sets, a rule the judge
applies; a planted feature with a known source token is explained as such; uninformative labels score
at chance; end to end, the shown examples' DFA records agree with ``sae.attribution.dfa``."""

import random

import numpy as np
import pytest

from headscope.explain.contexts import Context, ExplainContextsRequest, JudgeRequest
from headscope.explain.dfa_rules import DFAExplainer, cells, family
from headscope.explain.scorers import said_yes
from headscope.explain.scoring import balanced_accuracy  # (TPR+TNR)/2

VOCAB = [f" w{i}" for i in range(40)]


def _planted(rng, fire: bool, n=17):
    """A context; when ``fire``: " def" 3 tokens before an " x" that fires."""
    toks = [str(rng.choice(VOCAB)) for _ in range(n)]
    acts = [0.0] * n
    if fire:
        t = int(rng.integers(4, n))
        toks[t], toks[t - 3] = " x", " def"
        acts[t] = 1.0
    else:
        if rng.random() < 0.5:
            toks[int(rng.integers(4, n))] = " x"              # the destination token without its source
        else:
            toks[int(rng.integers(0, n))] = " def"            # the source without the destination
    return Context(toks, acts)


def test_planted_source_token_is_explained_as_such():
    rng = np.random.default_rng(0)
    active = [_planted(rng, True) for _ in range(10)]
    rand = [_planted(rng, False) for _ in range(10)]
    recs = [{"sources": [{"dist": 3, "token": " def", "induction": False, "dfa": 1.0}]} for _ in active]
    se = DFAExplainer()
    [expl] = se.explain_contexts([ExplainContextsRequest(active, rand, recs)])
    rule = se.parse(expl)
    assert rule["family"] == "local-context" and rule["source"][0] == "def" and rule["dest"][0] == "x"
    assert expl.startswith("Local-context feature") and '"def"' in expl.splitlines()[0]
    test = [(_planted(rng, True), True) for _ in range(30)] + [(_planted(rng, False), False) for _ in range(30)]
    probs = se.judge([JudgeRequest("detection", expl, c) for c, _ in test])
    assert balanced_accuracy(said_yes(probs), [t for _, t in test]) > 0.9
    # the source matters: the destination token alone (negatives half hold " x") does not fire it
    only_x = [p for p, (c, t) in zip(probs, test) if not t and any(tok == " x" for tok in c.tokens)]
    assert only_x and max(only_x) < 0.5


def test_families():
    ind = [{"sources": [{"dist": 20, "token": "b", "induction": True}]}] * 6 + \
          [{"sources": [{"dist": 2, "token": "c", "induction": False}]}] * 4
    assert family(ind)[0] == "induction"
    assert family([{"sources": [{"dist": d, "token": "a", "induction": False}]} for d in (1, 2, 30)])[0] == "local-context"
    assert family([{"sources": [{"dist": d, "token": "a", "induction": False}]} for d in (12, 40, 50)])[0] == \
        "long-range context"
    toks = ["a", "b", "c", "a"]                          # position 3: an earlier "a" whose successor "b" precedes it
    assert [s for _, s in cells("induction", set(), set(), toks)] == [0, 0, 0, 1]


def test_labels_independent_of_the_text_score_at_chance():
    """Negative control: activations placed at random, DFA sources random: held-out balanced accuracy
    of the rule, averaged over 30 features, sits at chance."""
    rng = np.random.default_rng(1)
    se = DFAExplainer()
    accs = []
    for _ in range(30):
        def ctx(fire):
            toks = [str(rng.choice(VOCAB)) for _ in range(17)]
            acts = [0.0] * 17
            if fire:
                acts[int(rng.integers(1, 17))] = 1.0
            return Context(toks, acts)
        active = [ctx(True) for _ in range(10)]
        recs = [{"sources": [{"dist": int(rng.integers(1, 12)), "token": str(rng.choice(VOCAB)),
                              "induction": False}]} for _ in active]
        [expl] = se.explain_contexts([ExplainContextsRequest(active, [ctx(False) for _ in range(10)], recs)])
        test = [ctx(True) for _ in range(10)] + [ctx(False) for _ in range(10)]
        truth = [True] * 10 + [False] * 10
        accs.append(balanced_accuracy(said_yes(se.judge([JudgeRequest("detection", expl, c) for c in test])), truth))
    assert abs(np.mean(accs) - 0.5) < 0.05


def test_contexts_carry_dfa_records_that_match_sae_attribution(tmp_path):
    """End to end on a tiny model: contexts.json holds, per shown example, the top DFA sources; the top
    source equals the argmax of headscope.sae.attribution.dfa at that destination; every feature has a
    family, and the dfa back-end explains and judges."""
    import torch
    from headscope.data import TokenCorpus
    from headscope.explain.features import (FeatureExplainOptions, FeatureScoreOptions, run_explain_features,
                                            run_score_features)
    from headscope.runs import RunDir, read_json
    from headscope.sae.attribution import dfa
    from headscope.sae.dashboards import run_dashboards
    from headscope.sae.io import load_sae
    from headscope.sae.options import DashboardOptions, TrainOptions
    from headscope.sae.train import run_train
    from headscope.testing.tiny import tiny_model
    from sae_helpers import small_corpus
    model = tiny_model("gpt2")
    run = RunDir(tmp_path / "run", model.identity())
    corpus_path = small_corpus(tmp_path)
    run_train(model, run, TrainOptions(layer=1, corpus=corpus_path, n_tokens=8192, batch_size=256,
                                       buffer_tokens=2048, expansion=2, architecture="topk", k=4, seq_len=64),
              progress=False)
    run_dashboards(model, run, DashboardOptions(name="L1", n_tokens=1024, batch_size=4), page_size=16, progress=False)
    opts = FeatureExplainOptions(sae="L1", backend="dfa", features=6, n_explain=4, n_test=5, windows=200)
    res = run_explain_features(model, run, opts, progress=False)
    ctx = read_json(run / "explain/features/L1/contexts.json")
    sae = load_sae(run / "sae/L1", model)
    corpus = TokenCorpus(model, corpus_path, seq_len=64, progress=False)
    recs = {}
    for i in range(int(read_json(run / "sae/L1/dashboards/index.json")["pages"])):
        recs.update(read_json(run / f"sae/L1/dashboards/page_{i:03d}.json")["features"])
    checked = 0
    for f, c in ctx["features"].items():
        assert c["family"] in ("induction", "local-context", "long-range context")
        shown = {(tuple(x["tokens"]), tuple(x["acts"])) for x in c["explain"]["active"]}
        for e in recs[f]["examples"]:
            if (tuple(e["context"]), tuple(e["acts"])) not in shown or checked >= 6:
                continue
            k = [tuple(x["tokens"]) for x in c["explain"]["active"]].index(tuple(e["context"]))
            rec = c["explain"]["dfa"][k]
            ids = corpus.sequence("heldout", e["seq"])[: e["pos"] + 1][None]
            d = dfa(model, sae, ids, [int(f)], dest=e["pos"])[0, 0, :, :, 0].sum(-1)     # [S] per source
            d[0] = -float("inf")
            assert rec["sources"][0]["dist"] == e["pos"] - int(d.argmax())
            assert rec["sources"][0]["dfa"] == pytest.approx(float(d.max()), abs=1e-3)
            checked += 1
    assert checked > 0
    ex = read_json(run / "explain/features/L1/explanations_dfa.json")
    assert all(v["family"] == ctx["features"][f]["family"] for f, v in ex["features"].items())
    s = run_score_features(model, run, FeatureScoreOptions(sae="L1", backend="dfa"), progress=False)
    assert s.probabilities == "rule" and s.detection["units"] >= 2
