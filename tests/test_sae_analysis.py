"""The polysemanticity test against its nulls, on constructed decoders of a tiny model's layer 1:
a genuinely two-role head is called polysemantic, a head whose features point in unrelated directions
(one role, e.g. copying different tokens) and a one-cluster head are not, and an untrained SAE (the
negative control) has no polysemantic head; the stage writes heads.json with the null rates."""

import numpy as np
import pytest
import torch

from headscope.runs import RunDir, read_json
from headscope.sae.analysis import group_sizes, pair_similarity, polysemanticity
from headscope.sae.io import save_sae
from headscope.sae.model import AttnSAE, SAEConfig
from headscope.testing.tiny import tiny_model

F = 128


def _cfg(model, layer=1):
    d = model.n_heads * model.d_head
    return SAEConfig(d_in=d, d_sae=F, n_heads=model.n_heads, d_head=model.d_head, layer=layer, architecture="topk", k=4,
                     model=model.identity())


def constructed_sae(model, seed=0):
    """Head 0: features 0-4 around direction u_A, 5-9 around u_B (two roles). Head 1: features 10-19
    with unrelated random directions (one role spread over many directions). Head 2: features 20-29
    around one direction u_C (one group). Head 3 and features 30+: random, spread over all heads."""
    g = torch.Generator().manual_seed(seed)
    H, Dh = model.n_heads, model.d_head
    dec = torch.randn(F, H, Dh, generator=g) * 0.3                          # background: diffuse features
    basis = torch.linalg.qr(torch.randn(Dh, Dh, generator=g))[0]
    uA, uB, uC = basis[0], basis[1], basis[2]

    def put(feats, head, centre):
        for f in feats:
            block = torch.randn(Dh, generator=g) if centre is None else centre + 0.03 * torch.randn(Dh, generator=g)
            dec[f] = 0.05 * torch.randn(H, Dh, generator=g)
            dec[f, head] = block / block.norm() * 2.0
    put(range(0, 5), 0, uA)
    put(range(5, 10), 0, uB)
    put(range(10, 20), 1, None)
    put(range(20, 30), 2, uC)
    sae = AttnSAE(_cfg(model), seed=seed)
    with torch.no_grad():
        W = dec.reshape(F, -1)
        sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
    return sae


def test_group_sizes_and_similarities_against_direct_computation():
    rel = np.zeros((6, 6), dtype=bool)
    for i, j in [(0, 1), (1, 2), (3, 4)]:
        rel[i, j] = rel[j, i] = True
    groups, k1, k2 = group_sizes(rel)
    assert groups == [[0, 1, 2], [3, 4]] and (k1, k2) == (3, 2)
    assert group_sizes(np.zeros((4, 4), dtype=bool))[1:] == (0, 0)
    b = torch.randn(2, 3, 5)
    tok = torch.tensor([[[1, 2, 3], [3, 4, 5], [7, 8, 9]], [[1, 2, 3], [1, 2, 3], [2, 3, 4]]])
    cos, jac = pair_similarity(b, tok)
    bn = b / b.norm(dim=-1, keepdim=True)
    assert torch.allclose(cos.float(), torch.einsum("dik,djk->dij", bn, bn), atol=1e-6)
    assert jac[0, 0, 1] == pytest.approx(1 / 5) and jac[0, 0, 2] == 0
    assert jac[1, 0, 1] == 1 and jac[1, 0, 2] == pytest.approx(2 / 4)


def test_two_role_head_is_polysemantic_others_are_not():
    model = tiny_model("gpt2")
    res = polysemanticity(model, constructed_sae(model), n_null=200, seed=0)
    h = res["heads"]
    assert h[0]["polysemantic"] and h[0]["q_poly"] <= 0.05, h[0]
    assert sorted(map(sorted, h[0]["groups"])) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert h[1]["verdict"] == "no structure beyond the null", h[1]          # one role, unrelated directions
    assert h[2]["verdict"] == "one group" and h[2]["groups"] == [list(h[2]["groups"][0])]
    assert sorted(h[2]["groups"][0]) == list(range(20, 30))
    assert not h[3]["polysemantic"]
    s = res["summary"]
    assert s["polysemantic_frac"] == 0.25
    # the negative control inside the stage: the same test on the nulls' own draws
    assert s["null_polysemantic_frac"]["untrained"] <= 0.05 and s["null_polysemantic_frac"]["permuted"] <= 0.05


@pytest.mark.parametrize("seed", [1, 2])
def test_untrained_sae_has_no_polysemantic_head(seed):
    """Negative control: a shape-matched untrained SAE (not one of the null's seeds) → no head is
    polysemantic, and no head shows structure beyond the null."""
    model = tiny_model("llama_gqa")
    sae = AttnSAE(_cfg(model), seed=10_000 + seed)
    res = polysemanticity(model, sae, n_null=200, seed=seed)
    assert res["summary"]["polysemantic_frac"] == 0.0
    assert all(v["q_poly"] > 0.05 for v in res["heads"].values())


def test_run_analysis_writes_heads_json(tmp_path):
    from headscope.sae.analysis import run_analysis
    from headscope.sae.options import AnalysisOptions
    from headscope.errors import HeadscopeError
    model = tiny_model("gpt2")
    run = RunDir(tmp_path / "run", model.identity())
    sae = constructed_sae(model)
    save_sae(sae, run.path / "sae" / "C")
    res = run_analysis(model, run, AnalysisOptions(name="C", n_null=100), progress=False)
    disk = read_json(run.path / "sae" / "C" / "heads.json")
    assert disk["polysemantic_frac"] == res["polysemantic_frac"] == 0.25
    assert set(disk["null_polysemantic_frac"]) == {"untrained", "permuted"}
    assert disk["heads"]["0"]["verdict"] == "polysemantic" and disk["heads"]["0"]["n_groups"] == 2
    assert len(disk["heads"]["0"]["top_features"]) == 10 and disk["heads"]["0"]["top_features"][0]["top_tokens"]
    assert 0 <= disk["uncalibrated"]["untrained"] <= 1
    with pytest.raises(HeadscopeError):
        run_analysis(model, run, AnalysisOptions(name="C", n_null=5))


def _null_rate_loop(source, k_null, q):
    """The definition of ``null_polysemantic_frac``, one draw and head at a time (reference)."""
    from headscope.sae.analysis import _bh, _stat_p
    k2 = {s: v[..., 1] for s, v in k_null.items()}
    D, H = k2[source].shape
    rates = []
    for d in range(D):
        ps = [max(_stat_p(int(k2[source][d, h]), np.delete(k2[s][:, h], d) if s == source else k2[s][:, h])
                  for s in k2) for h in range(H)]
        rates.append(float((_bh(np.array(ps)) <= q).mean()))
    return float(np.mean(rates))


def test_batched_components_and_null_rate_equal_the_loops():
    """The batched forms used by the stage give exactly what the per-draw loops give."""
    from headscope.sae.analysis import _null_rate, component_sizes
    rng = np.random.default_rng(0)
    for n, dens in [(10, 0.05), (10, 0.15), (10, 0.4), (6, 0.3), (1, 0.5), (0, 0.5)]:
        rel = rng.random((300, n, n)) < dens                                   # not symmetric: upper triangle read
        k1, k2, nc = component_sizes(rel)
        for d in range(300):
            groups, a, b = group_sizes(rel[d])
            assert (k1[d], k2[d]) == (a, b)
            assert nc[d] == n - sum(len(g) for g in groups) + len(groups)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        k_null = {s: rng.integers(0, 5, size=(60, 9, 2)) for s in ("untrained", "permuted")}
        for s in k_null:
            assert _null_rate(s, k_null, 0.05) == _null_rate_loop(s, k_null, 0.05)
            assert _null_rate(s, k_null, 0.5) == _null_rate_loop(s, k_null, 0.5)
