"""The whole neuron pipeline on a tiny model: stage functions, resume, artifacts, atlas data, the
random baseline comparison, and the CLI with its one-line errors."""

import json

import pytest
import torch

from headscope.cli import main
from headscope.errors import HeadscopeError
from headscope.explain import atlas_data as explain_atlas
from headscope.explain import stages as ex
from headscope.explain.options import CompareOptions, RunOptions, ScoreOptions
from headscope.neurons import atlas_data as neuron_atlas
from headscope.neurons import stages as ns
from headscope.neurons.options import AblateOptions, AttributeOptions, FindOptions, MineOptions
from headscope.runs import RunDir, read_tensors
from headscope.testing.tiny import save_tiny_model, tiny_model

MINE = dict(seq_len=48, top_k=8, top_k_test=12, max_tokens=1200)
SCORE = dict(max_per_class=6, min_per_class=2)


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    m = tiny_model("llama_gqa")
    run = RunDir(tmp_path_factory.mktemp("run"), m.identity())
    for which in ("top", "random"):
        ns.run_find(m, run, FindOptions(which=which, per_layer=2, require_space=False, min_chars=1, last_k=2))
        ns.run_mine(m, run, MineOptions(which=which, **MINE), progress=False)
        ns.run_attribute(m, run, AttributeOptions(which=which, k_sigma=1.0), progress=False)
        ex.run_explain(m, run, RunOptions(which=which), progress=False)
        ex.run_score(m, run, ScoreOptions(which=which, **SCORE), progress=False)
    ns.run_ablate(m, run, AblateOptions(which="top", max_pairs=4), progress=False)
    ns.run_ablate(m, run, AblateOptions(which="random", max_pairs=4), progress=False)
    ex.run_compare(run, CompareOptions(scores="statistical"))
    return m, run


def test_artifacts_shapes_and_consistency(done_run):
    m, run = done_run
    found = json.loads((run / "neurons/find.json").read_text())["neurons"]
    assert len(found) == 4 and {n["layer"] for n in found} == {1, 2}
    mined = json.loads((run / "neurons/mine.json").read_text())["neurons"]
    att = read_tensors(run / "neurons/attribution.safetensors")
    N, P, K = att["A"].shape
    assert (N, K) == (4, m.n_layers * m.n_heads)
    assert P == max(len(n["train"]) + len(n["test"]) for n in mined)
    for i, n in enumerate(mined):
        elig = (n["layer"] + 1) * m.n_heads                       # sequential: same-layer heads count
        rows = att["split"][i] >= 0
        assert (att["split"][i][rows] == torch.tensor([0] * len(n["train"]) + [1] * len(n["test"]), dtype=torch.int8)).all()
        assert not torch.isnan(att["A"][i, rows, :elig]).any() and torch.isnan(att["A"][i, :, elig:]).all()
    pairs = json.loads((run / "neurons/attribution.json").read_text())["pairs"]
    for p in pairs:                                              # every pair is a 25–75 % head
        i, k = p["neuron"], p["layer"] * m.n_heads + p["head"]
        tr = att["split"][i] == 0
        assert 0.25 <= att["active"][i, tr, k].float().mean().item() <= 0.75
    assert (run / "explain/scores_statistical.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "neurons/ablation.png").is_file()


def _wilson(k, n, z=1.959963984540054):
    """The Wilson score interval, written out (independent of scipy)."""
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return c - h, c + h


def _sign_flip_p(correct, docs):
    """One-sided sign-flip test over documents, written out: every assignment of signs to the documents'
    excess of right over ½ (balanced prompts: equal weights), p = share reaching the observed sum."""
    import itertools
    excess = {}
    for c, d in zip(correct, docs):
        excess[d] = excess.get(d, 0) + (1 if c else -1)
    v = list(excess.values())
    hits = sum(sum(e * x for e, x in zip(signs, v)) >= sum(v) for signs in itertools.product((1, -1), repeat=len(v)))
    return hits / 2 ** len(v)


def test_scores_are_balanced_with_intervals_and_fdr(done_run):
    import scipy.stats
    from headscope.explain.prompts import ClassifyRequest
    from headscope.explain.statistical import StatisticalExplainer
    m, run = done_run
    mined = json.loads((run / "neurons/mine.json").read_text())["neurons"]
    att = read_tensors(run / "neurons/attribution.safetensors")
    pairs = json.loads((run / "neurons/attribution.json").read_text())["pairs"]
    scores = json.loads((run / "explain/scores_statistical.json").read_text())
    expl = {(e["neuron"], e["name"]): e["explanation"]
            for e in json.loads((run / "explain/explanations_statistical.json").read_text())["pairs"]}
    assert len(scores["pairs"]) == len(pairs)
    scored = [r for r in scores["pairs"] if r["E"] is not None]
    assert scored, "no pair scored: the fixture is too small to test scoring"
    se = StatisticalExplainer()
    for r, p in zip(scores["pairs"], pairs):
        i, k = p["neuron"], p["layer"] * m.n_heads + p["head"]
        test = att["split"][i] == 1
        truth = att["active"][i, test, k].bool().tolist()
        npos, nneg = sum(truth), len(truth) - sum(truth)
        if r["E"] is None:                           # too few of a class: not scored, and says why
            assert min(npos, nneg) < SCORE["min_per_class"] and "held-out" in r["skipped"]
            continue
        mm = min(npos, nneg, SCORE["max_per_class"])
        assert r["n_pos"] == r["n_neg"] == mm                       # balanced
        assert [truth[j] for j in r["examples"]] == r["truth"]     # the truth is the attribution's mask
        texts = [ex.split_examples(mined[i], att["active"][i, att["split"][i] >= 0, k].bool().tolist(),
                              att["split"][i][att["split"][i] >= 0].tolist(), 1)[0][j] for j in r["examples"]]
        probs = se.classify_many([ClassifyRequest(expl[(r["neuron"], r["name"])], t) for t in texts])
        assert [round(x, 4) for x in probs] == r["predictions"]
        correct = sum((x >= 0.5) == t for x, t in zip(probs, r["truth"]))
        assert r["E"] == pytest.approx(correct / (2 * mm))          # balanced: E is the accuracy
        held = [pr for pr, s in zip(mined[i]["train"] + mined[i]["test"],
                                    att["split"][i][att["split"][i] >= 0].tolist()) if s == 1]
        docs = [held[j]["doc"] for j in r["examples"]]              # the scored prompts' documents
        assert r["documents"] == len(set(docs))
        if len(set(docs)) == len(docs):                             # independent prompts: Wilson, binomial
            lo, hi = _wilson(correct, 2 * mm)
            assert r["interval"] == "wilson"
            assert (r["E_low"], r["E_high"]) == (pytest.approx(lo), pytest.approx(hi))
            assert r["p"] == pytest.approx(scipy.stats.binom.sf(correct - 1, 2 * mm, 0.5))
        elif len(set(docs)) >= 2:                                   # clustered by document
            assert r["interval"] == "document" and r["E_low"] <= r["E"] <= r["E_high"]
            w = _wilson(correct, 2 * mm)
            assert r["E_high"] - r["E_low"] >= w[1] - w[0]                # never narrower than independent
            assert r["p"] == pytest.approx(_sign_flip_p(
                [(x >= 0.5) == t for x, t in zip(probs, r["truth"])], docs))
    ps = [r["p"] for r in scored]
    q = scipy.stats.false_discovery_control(ps)
    assert [r["q"] for r in scored] == pytest.approx(list(q))
    assert scores["summary"]["significant_bh"] == sum(x < 0.05 for x in q)
    per_neuron = {}
    for r in scored:
        per_neuron.setdefault(r["neuron"], []).append(r["E"])
    by_n = scores["summary"]["by_neuron"]
    assert by_n["n"] == len(per_neuron)
    assert by_n["mean"] == pytest.approx(sum(sum(v) / len(v) for v in per_neuron.values()) / len(per_neuron))
    assert "control" in scores["summary"] and all("E_control" in r for r in scores["pairs"])


def test_ablation_unit_is_the_neuron(done_run):
    import numpy as np
    import scipy.stats
    m, run = done_run
    abl = json.loads((run / "neurons/ablation.json").read_text())
    t = read_tensors(run / "neurons/ablation.safetensors")
    pairs = json.loads((run / "neurons/attribution.json").read_text())["pairs"]
    assert len(abl["pairs"]) == min(4, len(pairs))
    n_with_pairs = len({p["neuron"] for p in pairs})
    assert len({r["neuron"] for r in abl["pairs"]}) == min(4, n_with_pairs)   # max_pairs spreads over neurons
    best: dict = {}
    for p in pairs:                                   # strength = held-out active rate × mean attribution
        assert p["strength"] == pytest.approx(p["frac_test"] * p["mean_A"], abs=1e-4)
        best[p["neuron"]] = max(best.get(p["neuron"], -1e9), p["strength"])
    first: dict = {}
    for r in abl["pairs"]:
        first.setdefault(r["neuron"], r)
    assert all(r["strength"] == best[n] for n, r in first.items())            # each neuron's strongest pair
    effects = {}
    for r, dr, act in zip(abl["pairs"], t["drops"], t["active"]):
        ok = ~torch.isnan(dr)
        a, ia = dr[ok & act.bool()].numpy(), dr[ok & ~act.bool()].numpy()
        assert (r["n_active"], r["n_inactive"]) == (len(a), len(ia))
        if len(a) and len(ia):
            assert r["effect"] == pytest.approx(float(a.mean() - ia.mean()), abs=1e-6)
            assert r["p_mann_whitney"] == pytest.approx(scipy.stats.mannwhitneyu(a, ia, alternative="greater").pvalue)
            assert r["effect_low"] <= r["effect"] <= r["effect_high"] and 0 < r["p"] <= 1   # document-clustered
            effects.setdefault(r["neuron"], []).append(r["effect"])
    s = abl["summary"]
    assert s["unit"] == "neuron" and s["neurons"] == len(effects)
    assert s["effect"]["mean"] == pytest.approx(np.mean([np.mean(v) for v in effects.values()]))
    # both sets ablated: compared per neuron
    rnd = json.loads((run / "neurons/random/ablation.json").read_text())
    vs = json.loads((run / "neurons/ablation_vs_random.json").read_text())
    assert vs["random"]["n"] == rnd["summary"]["neurons"] and vs["mann_whitney"]["n1"] == len(effects)
    ref = scipy.stats.mannwhitneyu(list(abl["per_neuron"].values()), list(rnd["per_neuron"].values()))
    assert vs["mann_whitney"]["p"] == pytest.approx(ref.pvalue)


def test_comparison_is_per_neuron(done_run):
    import scipy.stats
    m, run = done_run
    comp = json.loads((run / "explain/comparison_statistical.json").read_text())
    assert comp["unit"] == "neuron"
    E = {}
    for which, sub in (("top", ""), ("random", "random/")):
        rows = json.loads((run / f"explain/{sub}scores_statistical.json").read_text())["pairs"]
        per = {}
        for r in rows:
            if r["E"] is not None:
                per.setdefault(r["neuron"], []).append(r["E"])
        E[which] = [sum(v) / len(v) for _, v in sorted(per.items())]
        assert comp[which]["n"] == len(E[which])
    if E["top"] and E["random"] and len(set(E["top"] + E["random"])) > 1:
        ref = scipy.stats.mannwhitneyu(E["top"], E["random"])
        assert comp["mann_whitney"]["p"] == pytest.approx(ref.pvalue)
    assert "detectable" in comp["power"]


def test_scores_carry_baselines_on_the_same_sample(done_run):
    """E_norm / E_probe are the baselines' held-out predictions evaluated on the very balanced sample E
    was scored on; a look-up needs E above chance and above E_norm."""
    m, run = done_run
    sc = json.loads((run / "explain/scores_statistical.json").read_text())
    att = {(p["neuron"], p["name"]): p for p in json.loads((run / "neurons/attribution.json").read_text())["pairs"]}
    n = 0
    for r in sc["pairs"]:
        if r["E"] is None:
            continue
        pred = att[r["neuron"], r["name"]]["baseline_pred"]["norm"]
        if pred is not None:
            sel = [pred[i] for i in r["examples"]]
            tpr = sum(p and t for p, t in zip(sel, r["truth"])) / sum(r["truth"])
            tnr = sum((not p) and (not t) for p, t in zip(sel, r["truth"])) / (len(r["truth"]) - sum(r["truth"]))
            assert r["E_norm"] == pytest.approx((tpr + tnr) / 2)
            n += 1
        assert r["lookup"] == bool(r["significant"] and r["E_norm"] is not None and r["E"] > r["E_norm"])
        assert "E_same_head" in r and "E_probe" in r
    assert n > 0 and sc["summary"]["unit"] == "neuron"


def test_stages_are_reused_through_the_contract(tmp_path, monkeypatch):
    """Through the stage contract a finished mine/attribute is reused (nothing recomputed) while its options
    and inputs are unchanged, and recomputed when an option changes."""
    from headscope.neurons import attribution, mining
    from headscope.neurons.instrument import AttributeOptions, FindOptions, MineOptions
    from headscope.registry import stage
    from headscope.runs import run_stage
    m = tiny_model("llama_gqa")
    run = RunDir(tmp_path / "run", m.identity())
    mine = MineOptions(seq_len=48, top_k=8, top_k_test=12, max_tokens=1200)
    run_stage(m, run, stage("neurons.find"), FindOptions(per_layer=2, require_space=False, min_chars=1, last_k=2))
    run_stage(m, run, stage("neurons.mine"), mine, progress=False)
    run_stage(m, run, stage("neurons.attribute"), AttributeOptions(k_sigma=1.0), progress=False)
    boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed"))
    monkeypatch.setattr(mining, "_running_top", boom)
    monkeypatch.setattr(attribution, "attribute_prompts", boom)
    assert not run_stage(m, run, stage("neurons.mine"), mine, progress=False)[1]
    assert not run_stage(m, run, stage("neurons.attribute"), AttributeOptions(k_sigma=1.0), progress=False)[1]
    monkeypatch.undo()
    assert run_stage(m, run, stage("neurons.attribute"), AttributeOptions(k_sigma=1.5), progress=False)[1]


def test_atlas_data(done_run):
    m, run = done_run
    nd = neuron_atlas.atlas_data(run.path)
    json.dumps(nd, allow_nan=False)
    assert len(nd["neurons"]) == 4
    n0 = next(iter(nd["neurons"].values()))
    assert n0["prompts"] and len(n0["prompts"][0]["tokens"]) == len(n0["prompts"][0]["acts"])
    pairs = json.loads((run / "neurons/attribution.json").read_text())["pairs"]
    assert sum(h["n_neurons"] for h in nd["per_head"].values()) == len(pairs)
    # every head active on some prompt of a neuron, outside the pairs, is listed under also_active
    att = json.loads((run / "neurons/attribution.json").read_text())
    want = {(h, f"{n['layer']}.{n['neuron']}") for n in att["neurons"] for h, st in n["heads"].items()
            if h not in n["explain"] and (st["frac_train"] > 0 or st["frac_test"] > 0)}
    got = {(h, x["neuron"]) for h, e in nd["per_head"].items() for x in e.get("also_active", [])}
    assert got == want and want
    ed = explain_atlas.atlas_data(run.path)
    json.dumps(ed, allow_nan=False)
    assert sum(h["n_explained"] for h in ed["per_head"].values()) == len(pairs)
    comp = json.loads((run / "explain/comparison_statistical.json").read_text())
    assert ed["scores"]["statistical"]["comparison"] == comp
    assert neuron_atlas.atlas_data(run.path / "nothing") is None and explain_atlas.atlas_data(run.path / "x") is None


def test_explain_needs_attribution_first(tmp_path):
    m = tiny_model("gpt2")
    run = RunDir(tmp_path / "r", m.identity())
    with pytest.raises(HeadscopeError, match="run `headscope neurons mine` first"):
        ex.run_explain(m, run, RunOptions())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("gpt2", tmp_path_factory.mktemp("tinygpt2"))


def test_cli_pipeline_and_errors(model_dir, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    base = ["--model", str(model_dir), "--out", out]
    assert main(["neurons", "find", *base, "--last-k", "1", "--per-layer", "2", "--no-require-space",
                 "--min-chars", "1"]) == 0
    assert "2 top neurons" in capsys.readouterr().out
    assert main(["neurons", "mine", *base, "--seq-len", "48", "--top-k", "6", "--top-k-test", "4",
                 "--max-tokens", "1000", "--quiet"]) == 0
    assert "train_prompts: 12" in capsys.readouterr().out
    assert main(["neurons", "attribute", *base, "--k-sigma", "1", "--quiet"]) == 0
    assert "pairs: " in capsys.readouterr().out
    # bad input: one line, exit 2
    assert main(["neurons", "find", *base, "--min-chars", "99", "--force"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]   # after the weight-loading progress bar
    assert last.startswith("headscope: error: no neuron") and "try" in last
    monkeypatch.delenv("HEADSCOPE_NO_SUCH_KEY", raising=False)
    assert main(["explain", "run", *base, "--backend", "openai", "--api-key-env", "HEADSCOPE_NO_SUCH_KEY"]) == 2
    assert "missing API key" in capsys.readouterr().err
    assert main(["neurons", "mine", *base, "--top-k-test", "100000", "--force", "--quiet"]) == 2
    assert "too small for the split" in capsys.readouterr().err
