"""The polysemanticity test against its nulls, on constructed decoders of a tiny model's layer 1:
a genuinely two-role head is called polysemantic, a head whose features point in unrelated directions
(one role, e.g. copying different tokens) and a one-cluster head are not, and an untrained SAE (the
negative control) has no polysemantic head; the permuted null does not borrow other heads' structure
(same-source pairs, which its calibration leaves out); the test's power from planted groups (geometry of
a planting against numpy, detections growing with group size, none for random "groups", BH as the real
test's); the stage writes heads.json with the null rates and the power, and returns its typed result."""

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
    res = run_analysis(model, run, AnalysisOptions(name="C", n_null=100, n_planted=0), progress=False)
    disk = read_json(run.path / "sae" / "C" / "heads.json")
    assert disk["polysemantic_frac"] == res.polysemantic_frac == 0.25
    assert res.power is None and disk["power"] is None and "power" not in disk["heads"]["0"]
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


def structured_neighbours_sae(model, seed=0):
    """Head 0: two groups of 3 (features 0-2 around e0, 3-5 around e1) and 4 unrelated features. Every
    other feature lives on heads 1-3, its block for head j in one tight cluster around e_{j+1} (e0…e4
    orthonormal): heads with strong structure of their own, which a head-permuted null hands to head 0
    as pairs of blocks from one source head."""
    g = torch.Generator().manual_seed(seed)
    H, Dh = model.n_heads, model.d_head
    basis = torch.linalg.qr(torch.randn(Dh, Dh, generator=g))[0]
    dec = 0.05 * torch.randn(F, H, Dh, generator=g)

    def tight(centre):
        b = centre + 0.03 * torch.randn(Dh, generator=g)
        return b / b.norm()
    for f in range(10):
        dec[f, 0] = 2 * (tight(basis[f // 3]) if f < 6 else tight(torch.randn(Dh, generator=g)))
    for f in range(10, F):
        for j in range(1, H):
            dec[f, j] = (1 + 0.1 * torch.rand(1, generator=g)) * tight(basis[1 + j])
    sae = AttnSAE(_cfg(model), seed=seed)
    with torch.no_grad():
        W = dec.reshape(F, -1)
        sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
    return sae


@pytest.mark.parametrize("seed", [0, 1])
def test_permuted_null_does_not_borrow_other_heads_structure(seed):
    """Pairs of blocks from one source head are left out of the permuted null's groups, as out of its
    calibration: head 0's two groups of 3 are found although heads 1-3 are each one tight cluster. (The
    old null counted those pairs: its mean k2 for head 0 was 2.3-2.5 and head 0 was not called.)"""
    model = tiny_model("gpt2")
    res = polysemanticity(model, structured_neighbours_sae(model, seed), n_null=200, seed=seed)
    h0 = res["heads"][0]
    assert sorted(map(sorted, h0["groups"])) == [[0, 1, 2], [3, 4, 5]]
    assert h0["null_mean_k2"]["permuted"] <= 0.5, h0["null_mean_k2"]
    assert h0["polysemantic"] and h0["q_poly"] <= 0.05, h0
    assert [res["heads"][h]["verdict"] for h in (1, 2, 3)] == ["one group"] * 3
    assert max(res["summary"]["null_polysemantic_frac"].values()) <= 0.05


def test_plant_groups_geometry_against_numpy():
    """A planting keeps the other features' blocks and every norm, puts 2g distinct features in two
    groups whose blocks have pairwise cosine ≈ cos inside a group and ≈ 0 across."""
    from headscope.sae.analysis import plant_groups
    Dh, n, D = 64, 10, 400
    blocks = torch.randn(n, Dh) * torch.linspace(0.5, 2, n)[:, None]
    for g, cos in [(2, 0.5), (3, 0.3), (5, 0.8)]:
        out, pos = plant_groups(blocks, g, cos, D, torch.Generator().manual_seed(g))
        assert out.shape == (D, n, Dh) and pos.shape == (D, 2, g)
        o, p, b = out.numpy(), pos.numpy(), blocks.numpy()
        assert all(len(set(r.ravel())) == 2 * g for r in p)
        np.testing.assert_allclose(np.linalg.norm(o, axis=-1), np.broadcast_to(np.linalg.norm(b, axis=-1), (D, n)),
                                   rtol=1e-5)
        within, across = [], []
        for d in range(D):
            planted = set(p[d].ravel())
            for i in range(n):
                if i not in planted:
                    np.testing.assert_array_equal(o[d, i], b[i])
            u = o[d] / np.linalg.norm(o[d], axis=-1, keepdims=True)
            within += [u[p[d, k, i]] @ u[p[d, k, j]] for k in range(2) for i in range(g) for j in range(i + 1, g)]
            across += [u[i] @ u[j] for i in p[d, 0] for j in p[d, 1]]
        assert abs(np.mean(within) - cos) < 0.02 and abs(np.mean(across)) < 0.02, (g, cos)


def _planted_sae(model, sae, head: int, g: int, cos: float, seed: int):
    """``sae`` with the head-``head`` blocks of its top features replaced by one planting (two groups of
    g): the decoder the power estimate simulates, built explicitly. Returns (sae, the two groups)."""
    from headscope.sae.analysis import _top_features, plant_groups
    from headscope.sae.attribution import weight_attribution
    F_, H, Dh = sae.cfg.d_sae, sae.cfg.n_heads, sae.cfg.d_head
    dec = sae.W_dec.detach().clone().reshape(F_, H, Dh)
    top = _top_features(weight_attribution(sae), torch.ones(F_, dtype=torch.bool), 10)[head]
    out, pos = plant_groups(dec[top, head], g, cos, 1, torch.Generator().manual_seed(seed))
    dec[top, head] = out[0]
    planted = AttnSAE(sae.cfg, seed=0)
    with torch.no_grad():
        planted.W_dec.copy_(dec.reshape(F_, -1))
    return planted, [sorted(top[pos[0, k]].tolist()) for k in range(2)]


@pytest.mark.parametrize("seed", [3, 4])
def test_two_planted_groups_of_five_are_detected(seed):
    """An untrained decoder (no polysemantic head: test above) with two groups of 5 planted into one
    head's top features: the real test calls that head polysemantic and finds exactly the planted groups."""
    model = tiny_model("llama_gqa")
    sae, groups = _planted_sae(model, AttnSAE(_cfg(model), seed=20_000 + seed), head=seed % 4, g=5, cos=0.95,
                               seed=seed)
    res = polysemanticity(model, sae, n_null=200, seed=seed)
    h = res["heads"][seed % 4]
    assert h["polysemantic"], h
    assert sorted(map(sorted, h["groups"])) == sorted(groups)
    assert sum(v["polysemantic"] for v in res["heads"].values()) == 1


def test_power_grows_with_group_size_and_random_groups_are_never_detected():
    """Power on an untrained decoder: tight planted groups (cos 0.95) of 5 are detected in ≥ 90 % of
    plantings, at least as often as groups of 2; "groups" of random directions (cos 0) never are (the
    negative control). Per-head counts add up to the summary."""
    model = tiny_model("llama_gqa")
    sae = AttnSAE(_cfg(model), seed=10_003)
    tight = polysemanticity(model, sae, n_null=200, seed=1, n_planted=32, planted_cos=0.95)["summary"]["power"]
    by = tight["by_group_size"]
    assert set(by) == {"2", "3", "5"} and all(v["planted"] == 32 * 4 for v in by.values())
    assert by["5"]["rate"] >= 0.9 and by["5"]["rate"] >= by["2"]["rate"] and by["3"]["rate"] >= by["2"]["rate"]
    assert tight["detected"] == sum(v["detected"] for v in by.values()) and tight["planted"] == 3 * 32 * 4
    res = polysemanticity(model, sae, n_null=200, seed=1, n_planted=32, planted_cos=0.0)
    assert res["summary"]["power"]["detected"] == 0
    assert all(v["power"]["planted"] == 96 and v["power"]["detected"] == 0 for v in res["heads"].values())


def test_power_counts_bh_over_heads_like_the_real_test():
    """A planting is detected when BH over the heads — its p in place of its head's, the real p of the
    others — calls its head, and its groups were found apart: the batched count equals a loop."""
    from headscope.sae.analysis import _bh, _power
    rng = np.random.default_rng(0)
    H, D = 6, 40
    p_real = rng.uniform(0, 1, H) ** 2
    planted = {(h, g): (rng.uniform(0, 0.05, D) ** 1.5, rng.random(D) < 0.8) for h in range(H) for g in (2, 3)}
    got = _power(planted, p_real, H, [2, 3], D, 0.05)
    for (h, g), (p, found) in planted.items():
        want = 0
        for d in range(D):
            ps = p_real.copy()
            ps[h] = p[d]
            want += bool(_bh(ps)[h] <= 0.05 and found[d])
        assert got["heads"][h]["by_group_size"][str(g)] == {"planted": D, "detected": want}
    assert 0 < got["summary"]["detected"] < got["summary"]["planted"] == H * 2 * D


def test_stage_result_typed_with_power(tmp_path):
    """``sae.analysis`` returns :class:`SAEAnalysisResult` (JSON round trip), heads.json has the power per
    head and overall; out-of-range power options are one-line errors."""
    from headscope.errors import HeadscopeError
    from headscope.sae.analysis import run_analysis
    from headscope.sae.options import AnalysisOptions
    from headscope.sae.results import SAEAnalysisResult
    model = tiny_model("gpt2")
    run = RunDir(tmp_path / "run", model.identity())
    save_sae(constructed_sae(model), run.path / "sae" / "C")
    res = run_analysis(model, run, AnalysisOptions(name="C", n_null=50, n_planted=4, planted_cos=0.9), progress=False)
    assert isinstance(res, SAEAnalysisResult) and SAEAnalysisResult.from_json(res.to_json()) == res
    disk = read_json(run.path / "sae" / "C" / "heads.json")
    assert disk["power"] == res.power and res.power["planted"] == 4 * 3 * model.n_heads
    assert disk["criterion"]["n_planted"] == 4 and disk["criterion"]["planted_cos"] == 0.9
    for v in disk["heads"].values():
        pw = v["power"]
        assert pw["planted"] == 12 and pw["detected"] == sum(x["detected"] for x in pw["by_group_size"].values())
        assert pw["cos"] == 0.9 and "planted" in pw["how"]
    for bad in ({"n_planted": -1}, {"planted_cos": 1.5}):
        with pytest.raises(HeadscopeError):
            AnalysisOptions(name="C", **bad)
