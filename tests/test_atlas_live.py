"""The live prompt views (lens, SAE features + DFA, firing neurons) against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from headscope.atlas.live import LiveEngine
from headscope.capture import capture
from headscope.study import load_config, run_study
from headscope.testing.study import tiny_study
from headscope.testing.tiny import tiny_model

STUDY = tiny_study("lens.train", "sae.train", "neurons.find", "neurons.mine",
                   tables={"lens.train": {"tokens": 512, "init_tokens": 512}, "sae.train": {"n_tokens": 2048},
                           "neurons.mine": {"max_tokens": 4000}})
PROMPT = "The list of the class is a list of the object"


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama_gqa")


@pytest.fixture(scope="module")
def engine(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("live") / "run"
    cfg = out.parent / "s.toml"
    cfg.write_text(STUDY)
    run_study(load_config(cfg), out=out, model=tiny)
    return LiveEngine(tiny, out)


def test_views_listed(engine):
    info = engine.info()
    assert len(info["views"]) == 4 and info["lens_heads"] == ["2.0", "2.1"] and info["saes"] == {"L1": 1}
    assert info["n_neurons"] == len(engine.neurons) > 0 and info["load_errors"] == {}


def test_lens_view_baseline_is_the_unembedding_of_the_head_result(engine, tiny):
    res = engine.run({"prompt": PROMPT, "heads": ["2.1", "0.0"]})
    assert "lens" not in res["heads"]["0.0"]  # no lens trained for 0.0
    lens = res["heads"]["2.1"]["lens"]
    S = len(res["tokens"])
    assert len(lens["lens"]) == len(lens["unembedding"]) == S and lens["lens"][0] == lens["unembedding"][0] == []
    assert all(len(x) <= 5 for x in lens["lens"][1:]) and any(lens["lens"][1:])  # position 0 is not modelled
    # ranked by the token's term of KL(lens ‖ null), as `lens show` does (never by probability: base rates)
    from headscope.lens.apply import show
    from headscope.lens.train import load_null
    null = load_null(engine.run_dir / "lens")
    ref = show(tiny, engine.lens["bank"], PROMPT, sites=[(2, 1)], k=5, null=null, by="kl")["heads"]["2.1"]
    assert [[x[0] for x in p["lens"]] for p in ref["positions"]] == lens["lens"][1:]
    assert all(np.all(np.diff(p) <= 1e-6) for p in lens["lens_term"][1:])
    # read in context: the attended source and ranks, for every picked head (lens ranks only with a lens)
    ic = res["heads"]["2.1"]["in_context"]
    assert len(ic["src"]) == S and ic["src"][0] is None and all(1 <= ic["src"][t] <= t for t in range(1, S))
    assert all(1 <= r <= tiny.d_vocab for r in ic["dla_rank_src"][1:] + ic["lens_rank_src"][1:])
    assert "lens_rank_src" not in res["heads"]["0.0"]["in_context"] and res["heads"]["0.0"]["in_context"]["dla_top"]
    ids = tiny.to_tokens(PROMPT)
    r = capture(tiny, ids, layers=[2], what={"result"})["result"][2][0, :, 1]          # [S, d]
    bank = engine.lens["bank"]
    with torch.no_grad():
        q = bank(r.float()[None], lenses=torch.tensor([bank.sites.index((2, 1))]))[0]   # [S, V] lens logits
    ids0 = ids[0]
    for t in range(1, S):
        assert ic["lens_rank_src"][t] == min(100, int((q[t] >= q[t, ids0[ic["src"][t]]]).sum()))
    ids = tiny.to_tokens(PROMPT)
    r = capture(tiny, ids, layers=[2], what={"result"})["result"][2][0, :, 1]          # [S, d]
    with torch.no_grad():
        logits = tiny.final_norm(r) @ tiny.W_U.T
    top = logits.argmax(-1)
    assert [x[0] for x in lens["unembedding"][1:]] == tiny.token_str(top)[1:]


def test_sae_view_dfa_sums_to_the_linear_preactivation(engine, tiny):
    res = engine.run({"prompt": PROMPT, "heads": []})
    view = res["views"]["sae"]["L1"]
    W = load_file(str(engine.run_dir / "sae" / "L1" / "sae_weights.safetensors"))
    W_enc, b_enc, b_dec = W["W_enc"], W["b_enc"], W["b_dec"]
    ids = tiny.to_tokens(PROMPT)
    z = capture(tiny, ids, layers=[1], what={"z"})["z"][1][0].reshape(ids.shape[1], -1).numpy()
    pre = (z - b_dec) @ W_enc + b_enc                                                     # [S, F]
    assert view["positions"][0] == []  # BOS is not modelled
    n = 0
    for t, feats in enumerate(view["positions"]):
        assert len(feats) <= 5
        acts = [f["act"] for f in feats]
        assert acts == sorted(acts, reverse=True)
        for f in feats:
            # top-k SAE: a firing feature's activation is its pre-activation
            assert f["act"] == pytest.approx(float(pre[t, f["feature"]]), abs=2e-4)
            # DFA over heads sums to z_t · W_enc[:, f] (the linear part, no biases)
            assert sum(f["dfa_heads"]) == pytest.approx(float(z[t] @ W_enc[:, f["feature"]]), abs=2e-3)
            assert all(0 <= s["pos"] <= t for s in f["dfa_sources"])
            n += 1
    assert n > 0


def test_neuron_view_fires_above_threshold(engine, tiny):
    res = engine.run({"prompt": PROMPT * 2, "heads": []})
    rows = res["views"]["neurons"]
    ids = tiny.to_tokens(PROMPT * 2)
    layers = sorted({n["layer"] for n in engine.neurons})
    post = capture(tiny, ids, layers=layers, what={"mlp_post"})["mlp_post"]
    by_key = {f"{n['layer']}.{n['neuron']}": n for n in engine.neurons}
    fired = set()
    for n in engine.neurons:
        a = post[n["layer"]][0, :, n["neuron"]]
        fired |= {(f"{n['layer']}.{n['neuron']}", t) for t in range(1, len(a)) if a[t] >= n["threshold"]}
    assert {(r["neuron"], r["pos"]) for r in rows} <= fired and len(rows) == min(16, len(fired))
    for r in rows:
        n = by_key[r["neuron"]]
        assert r["act"] == pytest.approx(float(post[n["layer"]][0, r["pos"], n["neuron"]]), abs=1e-4)
        layers_of_heads = {int(x["head"].split(".")[0]) for x in r["heads"]}
        assert max(layers_of_heads, default=0) <= n["layer"]  # only eligible heads (sequential blocks)
    rel = [r["rel_act"] for r in rows]
    assert rel == sorted(rel, reverse=True)
