"""SAE evaluation against independent computations: HF logits for the clean CE, a plain PyTorch hook
for zero-ablation and for the spliced reconstruction, numpy FVE; confidence intervals that cover the
value computed on the whole held-out split, bootstrap coverage on synthetic data, the "too small an
ablation effect" rule, and no-information SAEs that recover nothing."""

import json

import numpy as np
import pytest
import torch

from headscope.capture import capture
from headscope.data import TokenCorpus
from headscope.sampling import sample_sequences
from headscope.sae.evaluate import (bootstrap_ci, evaluate_sae, recovered_scores,
                                    _kl_rec, _ce_rec)
from headscope.sae.model import AttnSAE, SAEConfig
from headscope.testing.tiny import tiny_model


def many_docs_corpus(tmp_path, n_docs: int = 1200) -> str:
    """A corpus of many short documents (paragraphs of Python's doc topics), so that the held-out
    split holds enough documents to bootstrap over."""
    from pydoc_data import topics
    p = tmp_path / "paragraphs.jsonl"
    if not p.exists():
        paras = [q.strip() for k in sorted(topics.topics) for q in topics.topics[k].split("\n\n") if len(q.strip()) > 200]
        p.write_text("\n".join(json.dumps({"text": t}) for t in paras[:n_docs]) + "\n")
    return str(p)


def _identity_sae(model, layer, scale: float = 1.0):
    """f = [ReLU(x), ReLU(−x)], x̂ = scale · f·[I; −I] = scale · x."""
    d = model.n_heads * model.d_head
    sae = AttnSAE(SAEConfig(d_in=d, d_sae=2 * d, n_heads=model.n_heads, d_head=model.d_head, layer=layer,
                            architecture="standard"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0) * scale)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _constant_sae(model, layer, value: torch.Tensor):
    """A no-information SAE: x̂ = ``value`` (flattened [H·Dh]) whatever the input."""
    sae = _identity_sae(model, layer)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.copy_(value.reshape(-1))
    return sae


def _hooked_losses(model, ids, layer, fn):
    """Independent per-sequence CE and logprobs: HF forward with a raw pre-hook on o_proj that maps
    z [B, S, H·Dh] at positions ≥ 1 through ``fn`` (None: clean). CE over predictions at 1..S−2."""
    o_proj = model.block_module(layer, model.arch.o_proj)

    def hook(mod, args):
        z = args[0].clone()
        z[:, 1:] = fn(z[:, 1:])
        return (z,)
    h = o_proj.register_forward_pre_hook(hook) if fn is not None else None
    try:
        with torch.no_grad():
            lp = model.hf(input_ids=ids).logits.float().log_softmax(-1)
    finally:
        if h is not None:
            h.remove()
    ce = -lp[:, 1:-1].gather(-1, ids[:, 2:, None]).squeeze(-1).double().sum(1)
    return ce, lp


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_recovered_scores_and_ce_against_independent(tmp_path, family):
    model = tiny_model(family)
    tc = TokenCorpus(model, many_docs_corpus(tmp_path), seq_len=64, progress=False)
    mean = torch.zeros(model.n_heads, model.d_head)
    perfect = evaluate_sae(model, _identity_sae(model, 1), tc, n_tokens=640, batch_size=4, mean=mean, progress=False,
                           n_boot=200)
    assert perfect["ce_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    assert perfect["kl_recovered_zero"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["kl_sae"] == pytest.approx(0.0, abs=1e-6)
    assert perfect["fve"] == pytest.approx(1.0, abs=1e-5) and perfect["nmse"] < 1e-10
    assert perfect["n_sequences"] == 10 and perfect["n_documents"] >= 5
    # mean-ablation with a zero mean is zero-ablation
    assert perfect["ce_mean_ablation"] == pytest.approx(perfect["ce_zero_ablation"], rel=1e-6)
    # independent: HF logits on the same sequences, clean and with a raw zeroing hook
    idx, _ = sample_sequences(tc, "heldout", 10)
    ids = torch.stack([tc.sequence("heldout", int(i)) for i in idx])
    n = ids.shape[0] * (ids.shape[1] - 2)
    ce_clean, _ = _hooked_losses(model, ids, 1, None)
    ce_zero, _ = _hooked_losses(model, ids, 1, torch.zeros_like)
    assert perfect["ce_clean"] == pytest.approx(float(ce_clean.sum()) / n, rel=1e-4)
    assert perfect["ce_zero_ablation"] == pytest.approx(float(ce_zero.sum()) / n, rel=1e-4)
    assert perfect["n_predictions"] == n
    # a null SAE (x̂ = 0) recovers nothing against zero-ablation, and its CI says so
    res = evaluate_sae(model, _constant_sae(model, 1, torch.zeros(model.n_heads * model.d_head)), tc, n_tokens=640,
                       batch_size=4, mean=mean, progress=False, n_boot=200)
    for key in ("ce_recovered_zero", "kl_recovered_zero"):
        r = res["recovered"][key]
        assert r["value"] == pytest.approx(0.0, abs=1e-4)
        assert r["ci"][0] <= 1e-4 and r["ci"][1] >= -1e-4


def test_no_information_sae_recovers_zero_against_mean_ablation(tmp_path):
    """x̂ = the mean z ignores its input: 0 recovered against mean-ablation, CI containing 0; an
    identity SAE recovers 1 with a CI at 1."""
    model = tiny_model("gpt2")
    tc = TokenCorpus(model, many_docs_corpus(tmp_path), seq_len=64, progress=False)
    mean = torch.randn(model.n_heads, model.d_head, generator=torch.Generator().manual_seed(0))
    res = evaluate_sae(model, _constant_sae(model, 1, mean), tc, n_tokens=768, batch_size=4, mean=mean,
                       progress=False, n_boot=300)
    for key in ("kl_recovered_mean", "ce_recovered_mean"):
        r = res["recovered"][key]
        assert r["value"] == pytest.approx(0.0, abs=1e-4), r
        assert r["ci"][0] <= 1e-4 <= r["ci"][1] + 2e-4, r


def test_ci_covers_value_on_whole_heldout_split(tmp_path):
    """An untrained TopK SAE (partial, token-dependent recovery): the CI of KL recovered from 12
    sequences covers KL recovered computed independently (raw hooks) on all held-out sequences of
    60 documents, and the point estimates equal the hooked computation on the same 12 sequences. The
    random tiny model's predictions barely move under ablation, so CE recovered is flagged."""
    model = tiny_model("gpt2")
    tc = TokenCorpus(model, many_docs_corpus(tmp_path), seq_len=64, progress=False)
    mean = torch.zeros(model.n_heads, model.d_head)
    d = model.n_heads * model.d_head
    sae = AttnSAE(SAEConfig(d_in=d, d_sae=4 * d, n_heads=model.n_heads, d_head=model.d_head, layer=1,
                            architecture="topk", k=8), seed=0)
    res = evaluate_sae(model, sae, tc, n_tokens=12 * 64, batch_size=4, mean=mean, progress=False, n_boot=1000)

    def recon(z):
        with torch.no_grad():
            return sae.decode(sae.encode(z))

    def hooked(idx):
        ids = torch.stack([tc.sequence("heldout", int(i)) for i in idx])
        ce_c, lp_c = _hooked_losses(model, ids, 1, None)
        ce_s, lp_s = _hooked_losses(model, ids, 1, recon)
        ce_z, lp_z = _hooked_losses(model, ids, 1, torch.zeros_like)

        def kl(a, b):
            return float((a[:, 1:-1].exp() * (a[:, 1:-1] - b[:, 1:-1])).sum())
        kl_rec = 1 - kl(lp_c, lp_s) / kl(lp_c, lp_z)
        ce_rec = float((ce_z.sum() - ce_s.sum()) / (ce_z.sum() - ce_c.sum()))
        return kl_rec, ce_rec
    idx, _ = sample_sequences(tc, "heldout", 12)
    kl_same, ce_same = hooked(idx)
    assert res["kl_recovered_zero"] == pytest.approx(kl_same, abs=1e-4)
    assert res["ce_recovered_zero"] == pytest.approx(ce_same, rel=1e-3)
    n_all = tc.n_sequences("heldout")
    kl_all, _ = hooked(np.arange(n_all))
    lo, hi = res["recovered"]["kl_recovered_zero"]["ci"]
    assert lo <= kl_all <= hi and lo < res["kl_recovered_zero"] < hi, (lo, kl_all, hi)
    assert hi - lo > 1e-3                                   # an interval, not a point
    assert 0.2 < kl_all < 0.8
    ce = res["recovered"]["ce_recovered_zero"]
    assert abs(ce["ablation_effect"]) < 0.01 and not ce["meaningful"]
    assert res["recovered"]["headline"]["score"] == "kl_recovered_zero"


def test_bootstrap_ci_coverage_on_synthetic_clusters():
    """95 % CIs of a ratio of sums cover the population ratio in 88–99 % of 200 synthetic data sets
    of 40 documents of varying size (the population value known in closed form)."""
    rng = np.random.default_rng(0)
    # per document: n ~ 1 + Poisson(60) predictions; KL_abl = n · Gamma(2, 0.1); KL_sae = KL_abl · Beta(2, 6)
    true = 1 - 2 / 8                                        # 1 − E[Beta(2, 6)] (independent of KL_abl)
    hits = 0
    for rep in range(200):
        n = 1 + rng.poisson(60, 40)
        kl_abl = n * rng.gamma(2, 0.1, 40)
        kl_sae = kl_abl * rng.beta(2, 6, 40)
        lo, hi = bootstrap_ci((kl_sae, kl_abl), _kl_rec, n_boot=500, seed=rep)
        hits += lo <= true <= hi
    assert 0.88 <= hits / 200 <= 0.99, hits


def test_meaningful_rule_and_headline():
    """A recovered score is meaningful only when the lower CI bound of its ablation effect is at
    least min_effect nats per prediction; the headline is the first meaningful KL score."""
    rng = np.random.default_rng(1)
    D = 50
    n = np.full(D, 100.0)
    ce_clean = n * 3.0 + rng.normal(0, 2, D)

    def per_doc(effect_zero, effect_mean):
        ce_zero = ce_clean + n * effect_zero + rng.normal(0, 1, D)
        ce_mean = ce_clean + n * effect_mean + rng.normal(0, 1, D)
        return {"n": n, "ce_clean": ce_clean, "ce_sae": ce_clean + rng.normal(0, 1, D),
                "ce_zero": ce_zero, "ce_mean": ce_mean,
                "kl_sae": n * 0.01 * rng.gamma(4, 0.25, D), "kl_zero": n * effect_zero * 2 * rng.gamma(4, 0.25, D),
                "kl_mean": n * effect_mean * 2 * rng.gamma(4, 0.25, D)}
    big = recovered_scores(per_doc(0.5, 0.2), n_boot=500)
    assert big["ce_recovered_zero"]["meaningful"] and big["kl_recovered_mean"]["meaningful"]
    assert big["headline"]["score"] == "kl_recovered_mean"
    assert big["ce_recovered_zero"]["ablation_effect"] == pytest.approx(0.5, abs=0.02)
    small = recovered_scores(per_doc(0.3, 0.004), n_boot=500)
    assert not small["ce_recovered_mean"]["meaningful"] and not small["kl_recovered_mean"]["meaningful"]
    assert small["ce_recovered_zero"]["meaningful"] and small["headline"]["score"] == "kl_recovered_zero"
    # with the threshold at 0 the same small effect counts (its CI lies above 0 for KL)
    assert recovered_scores(per_doc(0.3, 0.004), n_boot=500, min_effect=0.0)["kl_recovered_mean"]["meaningful"]
    # too few documents: no CI, nothing meaningful
    one = recovered_scores({k: v[:1] for k, v in per_doc(0.5, 0.2).items()}, n_boot=100)
    assert one["kl_recovered_zero"]["ci"] is None and not one["headline"]["meaningful"]


def test_reconstruction_metrics_match_numpy(tmp_path):
    model = tiny_model("qwen2")
    tc = TokenCorpus(model, many_docs_corpus(tmp_path), seq_len=64, progress=False)
    d = model.n_heads * model.d_head
    sae = AttnSAE(SAEConfig(d_in=d, d_sae=24, n_heads=model.n_heads, d_head=model.d_head, layer=2,
                            architecture="topk", k=3), seed=2)
    res = evaluate_sae(model, sae, tc, n_tokens=256, batch_size=2, splice=False, progress=False)
    idx, _ = sample_sequences(tc, "heldout", 4)
    ids = torch.stack([tc.sequence("heldout", int(i)) for i in idx])
    z = capture(model, ids, layers=[2], what=("z",))["z"][2][:, 1:]
    x = z.reshape(-1, d).double().numpy()
    with torch.no_grad():
        acts = sae.encode(torch.from_numpy(x).float())
        xh = sae.decode(acts).double().numpy()
    fve = 1 - ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert res["fve"] == pytest.approx(fve, rel=1e-4, abs=1e-5)
    assert res["l0"] == pytest.approx(float((acts > 0).sum(-1).float().mean()), rel=1e-6)
    assert res["nmse"] == pytest.approx(((x - xh) ** 2).sum() / (x ** 2).sum(), rel=1e-4)
    freq = (acts > 0).float().mean(0)
    assert res["dead_frac"] == pytest.approx(float((freq == 0).float().mean()))
    assert sum(res["density_hist"]["counts"]) == int((freq > 0).sum())


def test_run_eval_writes_cis_and_the_atlas_says_how_good(tmp_path):
    from headscope.runs import RunDir, read_json, read_tensors
    from headscope.sae.atlas_data import atlas_data
    from headscope.sae.evaluate import run_eval
    from headscope.sae.options import EvalOptions
    from headscope.sae.io import save_sae
    from headscope.errors import HeadscopeError
    model = tiny_model("gpt2")
    run = RunDir(tmp_path / "run", model.identity())
    sae = _identity_sae(model, 1, scale=0.5)
    sae.cfg.model, sae.cfg.context_size = model.identity(), 64
    save_sae(sae, run.path / "sae" / "H")
    corpus = many_docs_corpus(tmp_path)
    with pytest.raises(HeadscopeError):
        run_eval(model, run, EvalOptions(name="H", n_tokens=10, corpus=corpus), progress=False)
    assert not (run.path / "sae/H/eval.json").exists()
    summary = run_eval(model, run, EvalOptions(name="H", n_tokens=640, batch_size=4, corpus=corpus, mean_tokens=640,
                                               n_boot=200), progress=False)
    ev = read_json(run.path / "sae/H/eval.json")
    assert summary["headline"] == ev["recovered"]["headline"] and summary["fve"] == ev["fve"]
    seq = read_tensors(run.path / "sae/H/per_sequence.safetensors")
    assert seq["kl_sae"].shape == (10,) and float(seq["kl_sae"].sum() / seq["n"].sum()) == pytest.approx(ev["kl_sae"])
    data = atlas_data(run.path)
    s = data["saes"][0]
    assert s["eval"]["headline"]["ci"] == ev["recovered"]["headline"]["ci"]
    # the tiny random model barely reacts to ablation: the sentence must say the ratio means little
    assert "KL recovered vs zero-ablation" in s["reconstruction"] and "too little" in s["reconstruction"]


def test_feature_pages_report_ce_recovered_against_both_ablations():
    """The line on the SAE's feature pages carries the headline KL score and CE recovered against zero- and
    mean-ablation, each with its CI, computed from the same per-document sums."""
    from headscope.sae.atlas_data import reconstruction_sentence
    from headscope.sae.evaluate import recovered_scores
    rng = np.random.default_rng(0)
    D = 12
    n = np.full(D, 100.0)
    ce_clean = rng.uniform(200, 300, D)
    per_doc = {"n": n, "ce_clean": ce_clean, "ce_sae": ce_clean + 20, "ce_zero": ce_clean + 100, "ce_mean": ce_clean + 60,
               "kl_sae": rng.uniform(10, 20, D), "kl_zero": rng.uniform(80, 100, D), "kl_mean": rng.uniform(50, 60, D)}
    rec = recovered_scores(per_doc, n_boot=200)
    ev = {"fve": 0.7, "l0": 32, "n_tokens": 1200, "n_documents": D, "recovered": rec}
    line = reconstruction_sentence(ev)
    want_zero = (per_doc["ce_zero"].sum() - per_doc["ce_sae"].sum()) / (per_doc["ce_zero"].sum() - ce_clean.sum())
    want_mean = (per_doc["ce_mean"].sum() - per_doc["ce_sae"].sum()) / (per_doc["ce_mean"].sum() - ce_clean.sum())
    assert f"CE recovered vs zero-ablation {want_zero:.2f}" in line and f"vs mean-ablation {want_mean:.2f}" in line
    assert line.startswith("KL recovered vs mean-ablation") and line.count("[") >= 3   # every score with its CI
