"""The lens readings survive their controls (issue 10): position 0 gives no free gain, evaluation is
spread over documents with SEs clustered by document, one BH rule decides "informative", a control
lens sits at zero, the null is refitted on every token seen, and a head with nothing to read shows
nothing — each checked with a synthetic head whose information content is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import headscope.lens.apply as apply_mod
import headscope.lens.evaluate as eval_mod
import headscope.lens.train as train_mod
from headscope.data import TokenCorpus
from headscope.lens import collect, sampling
from headscope.lens.apply import format_show, load_gains, scan, show
from headscope.lens.atlas_data import atlas_data
from headscope.lens.evaluate import run_eval
from headscope.lens.options import EvalOptions
from headscope.lens.lenses import LensConfig, load_bank
from headscope.lens.sampling import fixed_prefix, select_positions
from headscope.sampling import Windows
from headscope.lens.options import LensTrainConfig
from headscope.lens.train import load_null, run_train
from headscope.lens.verdict import decide
from headscope.runs import RunDir
from headscope.stats import benjamini_hochberg, cluster_bootstrap_se, clustered_mean_se, one_sided_p
from headscope.testing.tiny import tiny_model

CFG = dict(tokens=0, init_tokens=2048, batch_size=4, seq_len=32, chunk_tokens=64)
SITE = (2, 1)
OTHER = [(1, 0), (2, 3)]


@pytest.fixture(autouse=True)
def _lenses_read_r(monkeypatch):
    """These tests inject head outputs anywhere in d, not only in the span of W_O[h], so the lenses read
    r and not z (the z path equals the r path on real head outputs: tests/test_lens.py)."""
    from headscope.lens.lenses import LensBank
    monkeypatch.setattr(LensBank, "reads_z", lambda self: False)


def _patch(monkeypatch, fn, site=SITE):
    """Replace the output of ``site`` by ``fn(ids [B, S], logp [B·S, V], r [B·S, d]) -> [B·S, d]``
    everywhere the lens code reads head outputs (train, eval, show, scan)."""
    orig = collect.site_batch

    def patched(model, ids, sites, logprobs=True, interventions=(), space="result"):
        assert space == "result"
        R, lp = orig(model, ids, sites, logprobs=True, interventions=interventions)
        for k, s in enumerate(sites):
            if tuple(s) == site:
                R[k] = fn(ids, lp, R[k])
        return R, (lp if logprobs else None)
    for mod in (train_mod, eval_mod, apply_mod):
        monkeypatch.setattr(mod, "site_batch", patched)


def bos_only_head(ids, lp, r):
    """No information at positions ≥ 1 (fresh noise), a distinctive constant output at position 0."""
    S = ids.shape[1]
    out = torch.randn(r.shape, generator=None) * 0.5
    t0 = torch.arange(r.shape[0]) % S == 0
    out[t0] = 4.0
    return out


def noise_head(ids, lp, r):
    """No information anywhere: fresh Gaussian noise."""
    return torch.randn(r.shape) * 0.5


def oracle_head(model):
    """A head that writes the model's own centred prediction into the residual stream (readable)."""
    W_U = model.W_U.detach().float()

    def fn(ids, lp, r):
        y = lp - lp.mean(-1, keepdim=True)
        x = y @ W_U
        return x / x.std() * 0.5
    return fn


def _train_eval(tmp_path, m, name, sites, tokens=2048):
    run = RunDir(tmp_path / name, m.identity())
    run_train(m, run, sites, LensConfig(), LensTrainConfig(**CFG), progress=False)
    return run, run_eval(m, run, EvalOptions(tokens=tokens, batch_size=8), progress=False)


@pytest.fixture(scope="module")
def model():
    """A tiny GPT-2 whose final norm is scaled up, so that its predictions are peaked like a real model's
    (a random tiny model predicts nearly uniform distributions: KL(p ‖ null) ~ 1e-4 bits)."""
    m = tiny_model("gpt2")
    with torch.no_grad():
        m.hf.transformer.ln_f.weight.mul_(40.0)
    return m


def test_position0_gives_no_free_gain(tmp_path, model, monkeypatch):
    """The issue's synthetic head: nothing at positions ≥ 1, a distinctive position-0 output. Its gain must
    not exceed zero by more than its SE. Power check: with position 0 put back into the statistics (the
    old behaviour) the same head comes out informative, so this test can fail."""
    torch.manual_seed(0)
    _patch(monkeypatch, bos_only_head)
    _, out = _train_eval(tmp_path, model, "masked", [SITE])
    h = out["per_head"]["2.1"]
    assert h["gain"] <= h["gain_se"], h
    assert not h["informative"]
    monkeypatch.setattr(sampling, "fixed_prefix", lambda ids: 0)  # position 0 read like any other
    _, old = _train_eval(tmp_path, model, "unmasked", [SITE])
    o = old["per_head"]["2.1"]
    assert o["gain"] > 2 * o["gain_se"] and o["informative"], o


def test_control_lens_sits_at_zero_and_real_signal_is_found(tmp_path, model, monkeypatch):
    """Every eval reports a control lens (same training, scrambled input): its gain is ≤ its SE. A head
    that carries the prediction (oracle) is informative under the BH rule; a noise head is not; the
    noise head shows nothing in show/atlas/scan, the oracle head shows tokens."""
    torch.manual_seed(1)
    _patch(monkeypatch, oracle_head(model), site=(2, 1))
    orig_fn = train_mod.site_batch

    def both(m, ids, sites, logprobs=True, interventions=(), space="result"):
        assert space == "result"
        R, lp = orig_fn(m, ids, sites, logprobs=True, interventions=interventions)
        for k, s in enumerate(sites):
            if tuple(s) == (1, 0):
                R[k] = noise_head(ids, lp, R[k])
        return R, (lp if logprobs else None)
    for mod in (train_mod, eval_mod, apply_mod):
        monkeypatch.setattr(mod, "site_batch", both)
    run, out = _train_eval(tmp_path, model, "r", [(1, 0), (2, 1)])
    assert len(out["control"]) == 1
    c = out["control"]["control0"]
    assert c["source"] == "2.1" and c["gain"] <= c["gain_se"], c  # control of the oracle head: scrambled → nothing
    o, nz = out["per_head"]["2.1"], out["per_head"]["1.0"]
    assert o["informative"] and o["gain"] > 0.9 * o["kl_null"], o  # reads almost all the null misses
    assert not nz["informative"] and nz["gain"] <= nz["gain_se"], nz
    assert out["documents"] >= 5 and out["df"] == out["documents"] - 1
    ev = json.loads((tmp_path / "r/lens/eval.json").read_text())
    assert ev["control"]["control0"]["gain"] == c["gain"] and out["n_informative"] == 1
    # show: the noise head says nothing, even when forced to print (lens ≈ null: no KL term above threshold
    # is required, but it must not be flagged informative); the oracle head prints tokens
    bank, _ = load_bank(model, run / "lens")
    null = load_null(run / "lens")
    gains = load_gains(run / "lens")
    res = show(model, bank, "The value of the object is the", None, k=5, gains=gains, null=null)
    txt = format_show(res)
    assert "head 1.0" in txt and "not informative" in txt.split("head 2.1")[0]
    assert res["heads"]["2.1"]["informative"] and any(p["lens"] for p in res["heads"]["2.1"]["positions"])
    assert all(p["t"] >= 1 for p in res["heads"]["2.1"]["positions"])  # position 0 never read
    data = atlas_data(tmp_path / "r")
    assert "top_tokens" not in data["per_head"]["1.0"] and data["per_head"]["2.1"].get("top_tokens")
    assert data["summary"]["control"]["control0"]["gain"] == c["gain"]
    assert data["per_head"]["1.0"]["informative"] is False and data["per_head"]["2.1"]["informative"] is True
    sc = scan(model, bank, ["the", "of"], ["The value of the object", "the type of the function"], gains=gains, null=null)
    assert sc["uninformative_heads"] == ["1.0"] and sc["ranking"] == "kl"


def test_lens_equal_to_null_shows_nothing(model):
    """A lens whose prediction is the null everywhere has zero KL terms: the default ranking shows no token."""
    from headscope.lens.lenses import LensBank
    bank = LensBank(model, [SITE], LensConfig())
    null = torch.randn(model.d_vocab)
    with torch.no_grad():  # A = −I kills the head output, b = 0: logits = b_U + c = null
        bank.A.copy_(-torch.eye(model.d_model).unsqueeze(0))
        b_U = model.b_U.detach().float() if model.b_U is not None else torch.zeros(model.d_vocab)
        bank.c.copy_((null - b_U).unsqueeze(0))
    res = show(model, bank, "The value of the object", None, k=5, gains={"2.1": {"gain": 1.0, "gain_se": 0.1,
                                                                           "informative": True}}, null=null)
    assert all(p["lens"] == [] for p in res["heads"]["2.1"]["positions"])
    prob = show(model, bank, "The value of the object", None, k=5, null=null, by="prob")
    assert all(len(p["lens"]) == 5 for p in prob["heads"]["2.1"]["positions"])  # the old ranking prints base rates


def test_null_is_refitted_on_every_token_seen(tmp_path, model):
    """null.safetensors = log mean p over all positions of the closed-form pass and the refinement
    (position 0 left out), recomputed independently from the window plan."""
    run = RunDir(tmp_path / "n", model.identity())
    cfg = LensTrainConfig(**{**CFG, "tokens": 256, "init_tokens": 256, "batch_size": 2})
    s = run_train(model, run, [SITE], LensConfig(), cfg, progress=False)
    corpus = TokenCorpus(model, "default", seq_len=cfg.seq_len, progress=False)
    win = Windows(corpus, "train", seed=cfg.seed)
    n_seq = 4 * 2 + s["steps"] * 2  # closed-form pass: ceil(256 / (2·32)) batches of 2; then the steps
    ids = win.ids(0, n_seq)
    _, lp = collect.site_batch(model, ids, [SITE])
    lp = lp.double().view(n_seq, cfg.seq_len, -1)[:, 1:].reshape(-1, model.d_vocab)
    want = np.log(lp.exp().mean(0).numpy())
    np.testing.assert_allclose(load_null(run / "lens").double().numpy(), want, rtol=1e-4, atol=1e-4)
    assert s["null_positions"] == n_seq * (cfg.seq_len - 1)


def test_windows_spread_over_documents(tmp_path, model):
    """Windows come in a seeded random order over the whole split; document_of matches an EOS count."""
    docs = [{"text": f"Document number {i}. " + " ".join(["the value of a thing"] * (5 + i % 7))} for i in range(60)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs))
    corpus = TokenCorpus(model, str(path), seq_len=16, holdout=0.0, progress=False)
    win = Windows(corpus, "train", seed=0)
    stream = np.asarray(corpus._stream("train"))
    for o, d in zip(win.offsets[:20], win.docs[:20]):
        assert d == int((stream[:o] == corpus.eos).sum())  # documents before the offset
    assert len(set(win.docs[:8].tolist())) >= 6  # the first 8 windows come from many documents
    assert sorted(win.offsets.tolist()) == list(range(0, len(win) * 15, 15))  # disjoint, covering the split
    assert corpus.n_documents("train") == 60
    ids = win.ids(0, 4)
    assert fixed_prefix(ids) == 1 and (ids[:, 0] == corpus.bos).all()
    same = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 6]])
    assert fixed_prefix(same) == 2  # positions 0 and 1 have the same context in both sequences


def test_control_rows_come_from_another_sequence():
    ids = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10], [0, 11, 12, 13]])
    B, S = ids.shape
    R = torch.arange(B * S, dtype=torch.float32).view(1, -1, 1).repeat(2, 1, 1)  # value = flat position
    lp = torch.zeros(B * S, 3)
    R2, lp2, keep = select_positions(R, lp, ids, n_control=1, generator=torch.Generator().manual_seed(0))
    assert R2.shape == (2, B * (S - 1), 1) and lp2.shape[0] == B * (S - 1)
    assert R2[0, :, 0].tolist() == keep.tolist() and 0 not in keep.tolist()
    src = R2[1, :, 0].long()
    assert ((src // S) == (keep // S + 1) % B).all() and (src % S != 0).all()  # another sequence, never BOS


def test_stats_against_independent_formulas():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 40))
    m, se, G = clustered_mean_se(x)  # every unit its own cluster: the textbook SE
    np.testing.assert_allclose(se, x.std(1, ddof=1) / np.sqrt(40))
    # duplicated units inside one cluster carry no new information: SE unchanged (naive SE would shrink)
    m2, se2, G2 = clustered_mean_se(np.repeat(x, 2, 1), None, np.repeat(np.arange(40), 2))
    np.testing.assert_allclose(se2, se) and np.testing.assert_allclose(m2, m)
    assert G2 == 40 and np.isnan(clustered_mean_se(x, None, np.zeros(40))[1]).all()
    # BH by hand: the largest k with p_(k) ≤ k·q/m, all p ≤ p_(k) are discoveries
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    srt = np.sort(p)
    k = max(i + 1 for i in range(10) if srt[i] <= (i + 1) * 0.05 / 10)
    assert benjamini_hochberg(p, 0.05).tolist() == (p <= srt[k - 1]).tolist()
    from scipy.stats import norm, t
    assert one_sided_p(2.0, 1.0, None) == pytest.approx(norm.sf(2.0))
    assert one_sided_p(2.0, 1.0, 5) == pytest.approx(t.sf(2.0, 5))
    # the rule: many heads at z≈2.2 pass the 2·SE rule but few survive BH when most are null
    per = {f"{i}.0": {"gain": g, "gain_se": 1.0} for i, g in enumerate([2.2] + [0.0] * 30)}
    d = decide(per, df=None)
    assert d["0.0"]["informative_2se"] and not d["0.0"]["informative"]
    # cluster bootstrap SE of a mean equals the analytic SE for large samples
    sums = rng.normal(size=(1, 400))
    se_b = cluster_bootstrap_se(sums, np.ones(400), lambda mm: mm[:, 0], reps=4000)
    assert se_b == pytest.approx(sums.std(ddof=1) / 20, rel=0.1)


def test_show_lists_each_positions_top_tokens(model):
    """show's per-position lists equal a direct top-k of the lens' and the unembedding's softmax at that
    position (two heads, every position t >= 1)."""
    from headscope.lens.collect import site_batch
    from headscope.lens.evaluate import baseline_logits
    from headscope.lens.lenses import LensBank
    sites = [SITE, (1, 0)]
    torch.manual_seed(0)
    bank = LensBank(model, sites, LensConfig())
    with torch.no_grad():
        bank.A.normal_(0, 0.3)
    prompt = "The value of the object is the"
    res = show(model, bank, prompt, None, k=4, by="prob")
    R, _ = site_batch(model, model.to_tokens(prompt), sites, logprobs=False)
    with torch.no_grad():
        q = torch.softmax(bank(R), -1)
        u = torch.softmax(baseline_logits(model, R), -1)
    for j, (l, h) in enumerate(sites):
        pos = res["heads"][f"{l}.{h}"]["positions"]
        assert [p["t"] for p in pos] == list(range(1, R.shape[1]))
        for p in pos:
            top = q[j, p["t"]].topk(4)
            assert [x[0] for x in p["lens"]] == model.token_str(top.indices)
            np.testing.assert_allclose([x[1] for x in p["lens"]], top.values.numpy(), rtol=1e-4)
            assert [x[0] for x in p["unembed"]] == model.token_str(u[j, p["t"]].topk(4).indices)
