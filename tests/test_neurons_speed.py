"""The faster neuron paths against the direct computations they replace: the layer-wide mining cache
equals per-set mining (and the random set reads it with no corpus pass), last-position ablation
probabilities equal the full log-softmax path."""

import json

import pytest
import torch

from headscope.capture import HeadIntervention, capture
from headscope.data import TokenCorpus
from headscope.errors import HeadscopeError
from headscope.neurons import ablation, mining
from headscope.neurons import stages as ns
from headscope.neurons.options import FindOptions, MineOptions
from headscope.runs import RunDir
from headscope.testing.tiny import tiny_model

SEQ = 40


@pytest.fixture(scope="module")
def setup():
    m = tiny_model("llama_gqa")
    corpus = TokenCorpus(m, "default", seq_len=SEQ, progress=False)
    return m, corpus


def test_layer_cache_equals_per_set_mining(setup, tmp_path):
    m, corpus = setup
    g = torch.Generator().manual_seed(1)
    layers = [1, 2]
    full = mining.layer_top_sequences(m, corpus, layers, "train", 5, batch_size=4, max_tokens=11 * SEQ,
                                      state_path=tmp_path / "c.safetensors", progress=False)
    assert full["act"].shape == (5, len(layers) * m.d_mlp)
    for _ in range(2):                                  # two different neuron sets from the same layers
        neurons = [{"layer": layers[int(torch.randint(2, (1,), generator=g))],
                    "neuron": int(torch.randint(m.d_mlp, (1,), generator=g))} for _ in range(6)]
        for k in (3, 5):
            direct = mining.top_sequences(m, corpus, neurons, "train", k, batch_size=3, max_tokens=11 * SEQ,
                                          progress=False)
            sel = mining.select_neurons(full, layers, m.d_mlp, neurons, k)
            torch.testing.assert_close(sel["act"], direct["act"], rtol=1e-5, atol=1e-6)
            assert torch.equal(sel["seq"], direct["seq"]) and torch.equal(sel["pos"], direct["pos"])
    with pytest.raises(HeadscopeError):
        mining.select_neurons(full, layers, m.d_mlp, neurons, 6)
    # a finished cache is read back with no forward pass
    calls = {"n": 0}
    real = corpus.batches

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)
    corpus.batches = counting
    try:
        again = mining.layer_top_sequences(m, corpus, layers, "train", 5, batch_size=4, max_tokens=11 * SEQ,
                                           state_path=tmp_path / "c.safetensors", progress=False)
    finally:
        del corpus.batches
    assert calls["n"] == 0 and torch.equal(again["seq"], full["seq"])


def test_random_set_mines_from_the_cache(tmp_path, monkeypatch):
    """run_mine of the random set after the top set runs no corpus pass, and its mine.json equals the one
    mined without the cache."""
    m = tiny_model("llama_gqa")
    opts = dict(seq_len=48, top_k=5, top_k_test=7, max_tokens=1200)
    run = RunDir(tmp_path / "run", m.identity())
    for which in ("top", "random"):
        ns.run_find(m, run, FindOptions(which=which, per_layer=2, require_space=False, min_chars=1, last_k=2))
    ns.run_mine(m, run, MineOptions(which="top", **opts), progress=False)
    assert len(list(ns.mine_cache_dir(run).glob("top_*.safetensors"))) == 2       # train and held-out
    from headscope.data import TokenCorpus as TC
    real = TC.batches
    monkeypatch.setattr(TC, "batches", lambda *a, **k: (_ for _ in ()).throw(AssertionError("corpus pass")))
    ns.run_mine(m, run, MineOptions(which="random", **opts), progress=False)
    monkeypatch.setattr(TC, "batches", real)
    cached = json.loads((run / "neurons/random/mine.json").read_text())
    for f in ns.mine_cache_dir(run).glob("*"):
        f.unlink()
    ns.run_mine(m, run, MineOptions(which="random", **opts), progress=False)
    fresh = json.loads((run / "neurons/random/mine.json").read_text())
    for a, b in zip(cached["neurons"], fresh["neurons"]):
        for key in ("train", "test"):
            assert [(p["seq"], p["pos"], p["start"], p["ids"]) for p in a[key]] == \
                [(p["seq"], p["pos"], p["start"], p["ids"]) for p in b[key]]
            assert [p["act"] for p in a[key]] == pytest.approx([p["act"] for p in b[key]], abs=1e-5)
    assert len(cached["neurons"][0]["train"]) <= 5 and len(cached["neurons"][0]["test"]) <= 7


def test_last_position_probs_equal_full_logprobs(setup):
    m, corpus = setup
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, m.d_vocab, (n,), generator=g).tolist()
            for n in (3, 7, 7, 12, 5)]
    rows = [[m.bos_id] + r for r in rows]
    toks = [int(t) for t in torch.randint(0, 50, (len(rows),), generator=g)]
    for ivs in ([], [HeadIntervention(layer=1, heads=[0, 2], kind="zero")]):
        for idx, ids in mining.length_sorted_batches(rows, 3):
            last = [len(rows[i]) - 1 for i in idx]
            fast = ablation.last_token_probs(m, ids, last, [toks[i] for i in idx], ivs)
            lp = capture(m, ids, layers=[], what={"logprobs"}, interventions=ivs).logprobs      # [B, S, V]
            ref = lp[torch.arange(len(idx)), torch.tensor(last), torch.tensor([toks[i] for i in idx])].exp()
            torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-7)
            logits = capture(m, ids, layers=[], what={"logits"}, interventions=ivs,
                             logit_positions=torch.tensor(last)).logits
            full = capture(m, ids, layers=[], what={"logits"}, interventions=ivs).logits
            torch.testing.assert_close(logits[:, 0], full[torch.arange(len(idx)), torch.tensor(last)],
                                       rtol=1e-5, atol=1e-5)
    with pytest.raises(HeadscopeError):
        capture(m, ids, layers=[], what={"logits"}, logit_positions=torch.zeros(ids.shape[0] + 1, dtype=torch.long))


def test_length_sorted_batches_bound_padding():
    g = torch.Generator().manual_seed(3)
    rows = [[5] * int(n) for n in torch.randint(1, 100, (300,), generator=g)]
    seen = []
    for idx, ids in mining.length_sorted_batches(rows, 64):
        lens = [len(rows[i]) for i in idx]
        assert len(idx) <= 64 and ids.shape == (len(idx), max(lens))
        assert max(lens) <= 1.25 * min(lens) + 2
        for j, i in enumerate(idx):
            assert ids[j, : len(rows[i])].tolist() == rows[i]
        seen += idx
    assert sorted(seen) == list(range(len(rows)))
    pad = sum(ids.numel() for _, ids in mining.length_sorted_batches(rows, 64))
    old = sum(ids.numel() for _, ids in mining.length_sorted_batches(rows, 64, None))
    assert pad <= old


def test_trimming_equals_the_row_count_batching(setup, monkeypatch):
    """The padding bound changes only which prompts share a forward pass: the trimmed prompts equal those
    of the previous batching (row counts only)."""
    m, corpus = setup
    neurons = [{"layer": 2, "neuron": 3}, {"layer": 0, "neuron": 11}, {"layer": 2, "neuron": 40}, {"layer": 1, "neuron": 7}]
    state = mining.top_sequences(m, corpus, neurons, "train", 4, batch_size=8, max_tokens=12 * SEQ, progress=False)
    new = mining.trim_prompts(m, corpus, "train", neurons, state, keep=0.8, max_prompt_tokens=30, batch_size=64,
                              progress=False)
    monkeypatch.setattr(mining, "SLACK", None)
    old = mining.trim_prompts(m, corpus, "train", neurons, state, keep=0.8, max_prompt_tokens=30, batch_size=64,
                              progress=False)
    assert sum(len(ps) for ps in new) > 0
    for a, b in zip(new, old):
        assert [p["ids"] for p in a] == [p["ids"] for p in b]
        for p, q in zip(a, b):
            assert p["acts"] == pytest.approx(q["acts"], abs=1e-5)
