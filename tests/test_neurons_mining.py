"""Mining: the vectorised running top-k equals a brute-force search; trimming keeps ≥ keep of the
activation with the shortest suffix; train/test prompts come from their splits; resume; ablation."""

import pytest
import torch

from headscope.capture import capture
from headscope.data import TokenCorpus
from headscope.errors import HeadscopeError
from headscope.neurons import ablation, mining
from headscope.sampling import Windows
from headscope.testing.tiny import tiny_model

SEQ = 40


@pytest.fixture(scope="module")
def setup():
    m = tiny_model("llama_gqa")
    corpus = TokenCorpus(m, "default", seq_len=SEQ, progress=False)
    neurons = [{"layer": 2, "neuron": 3}, {"layer": 0, "neuron": 11}, {"layer": 2, "neuron": 40}, {"layer": 1, "neuron": 7}]
    return m, corpus, neurons


def _brute(m, corpus, neurons, split, n_seq, k):
    """Top-k over the first n_seq sequences of the shared sampler's plan (indices into the split)."""
    seqs = Windows(corpus, split, seed=0).seqs[:n_seq]
    best = []
    for s in seqs:
        ids = corpus.sequence(split, int(s))[None]
        cap = capture(m, ids, layers=[0, 1, 2], what={"mlp_post"})
        best.append([cap["mlp_post"][n["layer"]][0, 1:, n["neuron"]].max().item() for n in neurons])
    vals = torch.tensor(best)                                  # [n_seq, N]
    top = torch.topk(vals, k, dim=0)
    return top.values, torch.from_numpy(seqs).long()[top.indices]


def test_top_sequences_equals_brute_force(setup):
    m, corpus, neurons = setup
    n_seq, k = 9, 3
    state = mining.top_sequences(m, corpus, neurons, "train", k, batch_size=5, max_tokens=n_seq * SEQ, progress=False)
    vals, idx = _brute(m, corpus, neurons, "train", n_seq, k)
    torch.testing.assert_close(state["act"], vals, rtol=1e-4, atol=1e-5)
    assert torch.equal(state["seq"], idx)
    for r in range(k):
        for j, n in enumerate(neurons):
            s, p = int(state["seq"][r, j]), int(state["pos"][r, j])
            cap = capture(m, corpus.sequence("train", s)[None], layers=[n["layer"]], what={"mlp_post"})
            assert p >= 1
            assert cap["mlp_post"][n["layer"]][0, p, n["neuron"]].item() == pytest.approx(float(state["act"][r, j]), rel=1e-4)


def test_resume_after_interruption(setup, tmp_path, monkeypatch):
    m, corpus, neurons = setup
    full = mining.top_sequences(m, corpus, neurons, "train", 3, batch_size=1, max_tokens=23 * SEQ, progress=False)
    state_path = tmp_path / "state.safetensors"
    real, calls = mining.neuron_acts, {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 22:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(mining, "neuron_acts", flaky)
    with pytest.raises(KeyboardInterrupt):
        mining.top_sequences(m, corpus, neurons, "train", 3, batch_size=1, max_tokens=23 * SEQ,
                             state_path=state_path, progress=False)
    monkeypatch.setattr(mining, "neuron_acts", real)
    resumed_calls = {"n": 0}

    def counting(*a, **kw):
        resumed_calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(mining, "neuron_acts", counting)
    again = mining.top_sequences(m, corpus, neurons, "train", 3, batch_size=1, max_tokens=23 * SEQ,
                                 state_path=state_path, progress=False)
    assert resumed_calls["n"] == 3                     # 20 sequences were saved before the interruption
    torch.testing.assert_close(again["act"], full["act"])
    assert torch.equal(again["seq"], full["seq"])


def _act(m, ids, n):
    cap = capture(m, torch.tensor([ids]), layers=[n["layer"]], what={"mlp_post"})
    return cap["mlp_post"][n["layer"]][0, -1, n["neuron"]].item()


def test_trimming_keeps_activation_with_shortest_suffix(setup):
    m, corpus, neurons = setup
    for split, k in (("train", 3), ("heldout", 1)):
        state = mining.top_sequences(m, corpus, neurons, split, k, batch_size=8, max_tokens=10 * SEQ, progress=False)
        prompts = mining.trim_prompts(m, corpus, split, neurons, state, keep=0.8, max_prompt_tokens=1000, progress=False)
        for n, ps in zip(neurons, prompts):
            assert len(ps) == k
            for p in ps:
                seq = corpus.sequence(split, p["seq"]).tolist()
                assert p["ids"] == [m.bos_id] + seq[p["start"]: p["pos"] + 1]        # ends at the activating token
                assert p["full_act"] == pytest.approx(_act(m, seq[: p["pos"] + 1], n), rel=1e-4)
                assert p["act"] == pytest.approx(_act(m, p["ids"], n), rel=1e-4, abs=1e-6)
                assert p["acts"][-1] == pytest.approx(p["act"], abs=1e-5) and len(p["acts"]) == len(p["ids"])
                if p["full_act"] > 0:
                    assert p["act"] >= 0.8 * p["full_act"] - 1e-6
                    if p["start"] < p["pos"]:                 # one token shorter would lose too much
                        shorter = [m.bos_id] + seq[p["start"] + 1: p["pos"] + 1]
                        assert _act(m, shorter, n) < 0.8 * p["full_act"] + 1e-6


def test_trimming_tolerance(setup):
    """With a tolerance τ the kept prompt still keeps the activation, and a suffix at most max(1, τ·ℓ)
    tokens shorter (the bisection's last failing length) loses too much; τ = 0 is the exact search."""
    m, corpus, neurons = setup
    state = mining.top_sequences(m, corpus, neurons, "train", 3, batch_size=8, max_tokens=10 * SEQ, progress=False)
    exact = mining.trim_prompts(m, corpus, "train", neurons, state, keep=0.8, max_prompt_tokens=1000, progress=False)
    assert mining.trim_prompts(m, corpus, "train", neurons, state, keep=0.8, max_prompt_tokens=1000, progress=False,
                               tolerance=0.0) == exact
    loose = mining.trim_prompts(m, corpus, "train", neurons, state, keep=0.8, max_prompt_tokens=1000, progress=False,
                                tolerance=0.5)
    n_checked = 0
    for n, ps in zip(neurons, loose):
        for p in ps:
            seq = corpus.sequence("train", p["seq"]).tolist()
            assert p["act"] == pytest.approx(_act(m, p["ids"], n), rel=1e-4, abs=1e-6)
            if p["full_act"] <= 0:
                continue
            assert p["act"] >= 0.8 * p["full_act"] - 1e-6
            length = p["pos"] + 1 - p["start"]
            if 1 < length < p["pos"]:      # the search stopped below the full context: a failing length is near
                fail = [l for l in range(max(1, length - max(1, int(0.5 * length))), length)
                        if _act(m, [m.bos_id] + seq[p["pos"] + 1 - l: p["pos"] + 1], n) < 0.8 * p["full_act"] + 1e-6]
                assert fail, (length, p["pos"])
                n_checked += 1
    assert n_checked > 0


def test_max_prompt_tokens_drops_long_prompts(setup):
    m, corpus, neurons = setup
    state = mining.top_sequences(m, corpus, neurons, "train", 3, batch_size=8, max_tokens=10 * SEQ, progress=False)
    prompts = mining.trim_prompts(m, corpus, "train", neurons, state, keep=1.0, max_prompt_tokens=3, progress=False)
    assert all(len(p["ids"]) <= 3 for ps in prompts for p in ps)
    # the capped search keeps exactly the prompts of the uncapped one that fit, trimmed the same way
    for cap in (4, 9):
        capped = mining.trim_prompts(m, corpus, "train", neurons, state, keep=0.8, max_prompt_tokens=cap, progress=False)
        free = mining.trim_prompts(m, corpus, "train", neurons, state, keep=0.8, max_prompt_tokens=1000, progress=False)
        for a, b in zip(capped, free):
            assert [p["ids"] for p in a] == [p["ids"] for p in b if len(p["ids"]) <= cap]
            for p, q in zip(a, [p for p in b if len(p["ids"]) <= cap]):
                assert p["acts"] == pytest.approx(q["acts"], abs=1e-5)


def test_corpus_too_small_for_split(setup):
    m, corpus, neurons = setup
    with pytest.raises(HeadscopeError, match="too small for the split"):
        mining.check_corpus(corpus, 5, corpus.n_sequences("heldout") + 1)


def test_ablation_drop_equals_zeroed_output_weights(setup):
    m, _, _ = setup
    rows, toks = [[0, 5, 9, 200, 31], [0, 44, 2], [0, 7, 8, 9]], [17, 3, 250]
    clean = ablation.token_probs(m, rows, toks)
    abl = ablation.token_probs(m, rows, toks, heads=(1, 2))
    W = m.hf.model.layers[1].self_attn.o_proj.weight
    saved = W.detach().clone()
    try:
        with torch.no_grad():
            W[:, 2 * m.d_head: 3 * m.d_head] = 0          # the head's columns of the output projection
        for i, (r, t) in enumerate(zip(rows, toks)):
            p = torch.softmax(m.hf(torch.tensor([r])).logits[0, -1].double(), -1)[t].item()
            assert abl[i].item() == pytest.approx(p, rel=1e-4)
        with torch.no_grad():
            W.copy_(saved)
        for i, (r, t) in enumerate(zip(rows, toks)):
            p = torch.softmax(m.hf(torch.tensor([r])).logits[0, -1].double(), -1)[t].item()
            assert clean[i].item() == pytest.approx(p, rel=1e-4)
    finally:
        with torch.no_grad():
            W.copy_(saved)


def test_value_mode_ablation_silences_the_kv_group(setup):
    m, _, _ = setup
    assert ablation.ablated_heads(m, 2, "z") == [2]
    assert ablation.ablated_heads(m, 2, "value") == [2, 3]          # 4 query heads, 2 KV groups
    rows, toks = [[0, 5, 9, 200, 31], [0, 44, 2]], [17, 3]
    abl = ablation.token_probs(m, rows, toks, heads=(0, 3), mode="value")
    W = m.hf.model.layers[0].self_attn.v_proj.weight
    saved = W.detach().clone()
    try:
        with torch.no_grad():
            W[m.d_head: 2 * m.d_head] = 0                             # KV group 1's value rows
        for i, (r, t) in enumerate(zip(rows, toks)):
            p = torch.softmax(m.hf(torch.tensor([r])).logits[0, -1].double(), -1)[t].item()
            assert abl[i].item() == pytest.approx(p, rel=1e-4)
    finally:
        with torch.no_grad():
            W.copy_(saved)
