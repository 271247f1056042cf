"""Feature dashboards from one forward pass: what the scan keeps per sequence gives the same pages as
the second pass it replaces (forced with a zero or a small memory bound), the kept memory is pruned to
the sequences still in use, the records agree with a direct computation (activations, DFA), and an
SAE that never fires gives no page (the negative control)."""

import pytest
import torch

import headscope.sae.dashboards as dash
from headscope.capture import capture
from headscope.data import TokenCorpus
from headscope.runs import RunDir, read_json
from headscope.sae.io import save_sae
from headscope.sae.model import AttnSAE, SAEConfig
from headscope.sae.options import DashboardOptions
from headscope.testing.tiny import tiny_model

from sae_helpers import small_corpus

SEQ = 32


def _setup(tmp_path, family="llama_gqa", arch="topk", F=96, seed=0):
    model = tiny_model(family)
    run = RunDir(tmp_path / "run", model.identity())
    cfg = SAEConfig(d_in=model.n_heads * model.d_head, d_sae=F, n_heads=model.n_heads, d_head=model.d_head, layer=1,
                    architecture=arch, k=4, context_size=SEQ, model=model.identity())
    sae = AttnSAE(cfg, seed=seed)
    save_sae(sae, run.path / "sae" / "S")
    return model, run, sae, small_corpus(tmp_path)


def _pages(run, idx):
    folder = run.path / "sae" / "S" / "dashboards"
    return [read_json(folder / f"page_{i:03d}.json") for i in range(idx["pages"])]


def _build(model, run, corpus, monkeypatch, **kw):
    """Run the dashboards; returns (index, pages, number of sequences the second pass recomputed)."""
    seen = []
    real = dash._second_pass

    def spy(model, sae, corpus, order, batch_size):
        seen.extend(order)
        yield from real(model, sae, corpus, order, batch_size)
    monkeypatch.setattr(dash, "_second_pass", spy)
    idx = dash.run_dashboards(model, run, DashboardOptions(name="S", n_tokens=24 * SEQ, batch_size=4,
                                                           corpus=corpus), page_size=8, progress=False, **kw)
    return idx, _pages(run, idx), len(seen)


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_kept_path_writes_the_same_pages_as_the_second_pass(tmp_path, monkeypatch, family):
    model, run, sae, corpus = _setup(tmp_path, family)
    idx_a, pages_a, n_a = _build(model, run, corpus, monkeypatch)
    assert n_a == 0                                                   # nothing recomputed
    assert idx_a["alive"] >= 4 and idx_a["pages"] >= 1
    idx_b, pages_b, n_b = _build(model, run, corpus, monkeypatch, cache_bytes=0)
    assert n_b > 0
    assert idx_a == idx_b and pages_a == pages_b
    # a bound exceeded during the scan (half of what it keeps at the end): the kept tensors are let go
    # and the second pass runs
    scan = dash._scan(model, sae, TokenCorpus(model, corpus, seq_len=SEQ), 24 * SEQ, 4, 10, 20, progress=False)
    half = sum(k.nbytes() for k in scan.kept.values()) // 2
    idx_c, pages_c, n_c = _build(model, run, corpus, monkeypatch, cache_bytes=half)
    assert n_c > 0 and idx_c == idx_a and pages_c == pages_a


def test_kept_memory_is_pruned_to_sequences_in_use(tmp_path):
    model, run, sae, corpus = _setup(tmp_path, F=8)
    tc = TokenCorpus(model, corpus, seq_len=SEQ)
    scan = dash._scan(model, sae, tc, 24 * SEQ, 4, n_examples=2, n_samples=2, progress=False)
    in_use, tops = dash._seqs_in_use(SEQ, scan.top_v, scan.top_i, scan.smp_k, scan.smp_i)
    assert set(scan.kept) == in_use and len(in_use) < 24                # 8 features × 4 slots: few sequences
    assert {s for s, k in scan.kept.items() if k.pattern is not None} == tops
    # the kept activations are the dense ones, exactly
    s = min(scan.kept)
    ids = tc.sequence("heldout", s)[None]
    z = capture(model, ids, layers=[1], what=("z", "pattern"), stop_after=1)["z"][1]
    assert torch.allclose(scan.kept[s].dense(SEQ, 8), dash._encode_seqs(sae, z)[0], atol=1e-5)
    assert dash._scan(model, sae, tc, 24 * SEQ, 4, 2, 2, progress=False, cache_bytes=1).kept is None


def test_records_match_a_direct_computation(tmp_path, monkeypatch):
    """Context activations = the SAE's encoding of z at those positions; the DFA summed over heads and
    sources = z[t] · W_enc[:, f] (its linear pre-activation without the constant)."""
    model, run, sae, corpus = _setup(tmp_path)
    idx, pages, _ = _build(model, run, corpus, monkeypatch)
    tc = TokenCorpus(model, corpus, seq_len=SEQ)
    checked = 0
    for f, rec in list(pages[0]["features"].items())[:12]:
        f = int(f)
        ex = rec["examples"][0]
        ids = tc.sequence("heldout", ex["seq"])[None]
        z = capture(model, ids, layers=[1], what=("z",), stop_after=1)["z"][1]     # sdpa: independent of eager
        acts = sae.encode(z[0].reshape(SEQ, -1))[:, f]
        lo = ex["pos"] - ex["index"]
        want = acts[lo:lo + len(ex["acts"])].tolist()
        if lo == 0:
            want[0] = 0.0                                                        # BOS is not modelled
        assert ex["acts"] == pytest.approx(want, abs=2e-3)
        assert ex["act"] == pytest.approx(rec["max_act"]) and ex["acts"][ex["index"]] == pytest.approx(ex["act"], abs=1e-3)
        assert ex["context"] == model.token_str(ids[0, lo:lo + len(ex["acts"])].tolist())
        t = rec["dfa"]["dest"]
        lin = float(z[0, t].reshape(-1) @ sae.W_enc[:, f].detach())
        assert sum(rec["dfa"]["per_head"]) == pytest.approx(lin, abs=1e-3 + 1e-3 * abs(lin))
        checked += 1
    assert checked == min(12, len(pages[0]["features"]))


def test_sae_that_never_fires_has_no_pages(tmp_path, monkeypatch):
    """Negative control: an encoder bias far below any pre-activation → no live feature, no page."""
    model, run, sae, corpus = _setup(tmp_path, arch="standard")
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)
    save_sae(sae, run.path / "sae" / "S")
    idx, pages, _ = _build(model, run, corpus, monkeypatch)
    assert idx["alive"] == 0 and idx["pages"] == 0 and pages == []
