"""Congruence (find) against a direct numpy/scipy computation from the raw HF weights."""

import numpy as np
import pytest
import scipy.stats

from headscope.errors import HeadscopeError
from headscope.neurons import congruence
from headscope.testing.tiny import FAMILIES, tiny_model


def _raw_weights(m, layer):
    """W_out [M, d], W_U [V, d], final gain [d] read straight from the HF modules, in numpy."""
    hf = m.hf
    fam = m.arch.family
    if fam == "gpt2":
        blk, fn = hf.transformer.h[layer], hf.transformer.ln_f
        W_out = blk.mlp.c_proj.weight.detach().numpy()          # Conv1D: [in=M, out=d]
        gain = fn.weight.detach().numpy()
    elif fam == "gpt_neox":
        blk, fn = hf.gpt_neox.layers[layer], hf.gpt_neox.final_layer_norm
        W_out = blk.mlp.dense_4h_to_h.weight.detach().numpy().T  # Linear: [out=d, in=M]
        gain = fn.weight.detach().numpy()
    else:
        blk, fn = hf.model.layers[layer], hf.model.norm
        W_out = blk.mlp.down_proj.weight.detach().numpy().T
        gain = fn.weight.detach().numpy() + (1.0 if fam == "gemma2" else 0.0)
    WU = hf.lm_head.weight.detach().numpy() if hasattr(hf, "lm_head") else hf.embed_out.weight.detach().numpy()
    W_out = W_out.astype(np.float64)
    if fam in ("gpt2", "gpt_neox"):
        W_out = W_out - W_out.mean(1, keepdims=True)
    return W_out, WU.astype(np.float64) * gain.astype(np.float64)[None]


@pytest.mark.parametrize("unembed", ["centred", "raw"])
@pytest.mark.parametrize("family", FAMILIES)
def test_congruence_matches_numpy(family, unembed):
    m = tiny_model(family)
    for layer in (0, 2):
        lc = congruence.layer_congruence(m, layer, chunk=7, unembed=unembed)  # chunking must not matter
        W_out, WU = _raw_weights(m, layer)
        if unembed == "centred":
            WU = WU - WU.mean(0, keepdims=True)
        C = W_out @ WU.T                                                           # [M, V]
        np.testing.assert_array_equal(lc.token.numpy(), C.argmax(1))
        np.testing.assert_allclose(lc.dot.numpy(), C.max(1), rtol=1e-4, atol=1e-5)
        cos = C.max(1) / (np.linalg.norm(W_out, axis=1) * np.linalg.norm(WU[C.argmax(1)], axis=1))
        np.testing.assert_allclose(lc.cos.numpy(), cos, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(lc.kurtosis.numpy(), scipy.stats.kurtosis(C, axis=1, fisher=False), rtol=1e-3)
        np.testing.assert_allclose(lc.skew.numpy(), scipy.stats.skew(C, axis=1), rtol=1e-3, atol=1e-4)
        sup = congruence.layer_congruence(m, layer, kind="suppression", unembed=unembed)
        np.testing.assert_array_equal(sup.token.numpy(), C.argmin(1))
        np.testing.assert_allclose(sup.dot.numpy(), -C.min(1), rtol=1e-4, atol=1e-5)


def test_find_ranks_and_filters():
    m = tiny_model("llama_gqa")
    res = congruence.find_neurons(m, [1, 2], per_layer=4, require_space=True, min_chars=3)
    lc = congruence.layer_congruence(m, 2)
    for n in res["neurons"]:
        assert n["token"].startswith(" ") and len(n["token"].strip()) >= 3
    l2 = [n for n in res["neurons"] if n["layer"] == 2]
    assert [n["rank"] for n in l2] == list(range(len(l2)))
    dots = [n["dot"] for n in l2]
    assert dots == sorted(dots, reverse=True)
    # every neuron with a larger dot than the last chosen one was rejected by the filter
    passing = [i for i in range(m.d_mlp)
               if congruence.token_passes(m.tokenizer.decode([int(lc.token[i])]), True, 3, set())]
    best = sorted(passing, key=lambda i: -float(lc.dot[i]))[:4]
    assert [n["neuron"] for n in l2] == best
    # a reject list removes a token
    tok = l2[0]["token"]
    res2 = congruence.find_neurons(m, [2], per_layer=4, reject=[tok])
    assert all(n["token"] != tok for n in res2["neurons"])


def test_random_neurons_pass_the_same_filters_and_are_uniform_among_those_that_do():
    """Issue 21: random neurons are filtered exactly like congruent ones (a sub-word token would be cut by the
    explainer's prompt format), then drawn uniformly (seeded) among the neurons that pass."""
    m = tiny_model("llama_gqa")
    res = congruence.random_neurons(m, [1, 2], per_layer=4, seed=3, require_space=True, min_chars=3)
    lc = {l: congruence.layer_congruence(m, l) for l in (1, 2)}
    passing = {l: {i for i in range(m.d_mlp)
                   if congruence.token_passes(m.tokenizer.decode([int(lc[l].token[i])]), True, 3, set(congruence.DEFAULT_REJECT))}
               for l in (1, 2)}
    assert len(res["neurons"]) == sum(min(4, len(passing[l])) for l in (1, 2))
    for n in res["neurons"]:
        assert n["neuron"] in passing[n["layer"]] and n["token"].startswith(" ") and len(n["token"].strip()) >= 3
        assert n["token_id"] == int(lc[n["layer"]].token[n["neuron"]])
    assert res["per_layer"]["2"]["passed"] == len(passing[2])
    again = congruence.random_neurons(m, [1, 2], per_layer=4, seed=3, require_space=True, min_chars=3)
    assert again == res                                                  # seeded
    other = congruence.random_neurons(m, [1, 2], per_layer=4, seed=4, require_space=True, min_chars=3)
    assert [n["neuron"] for n in other["neurons"]] != [n["neuron"] for n in res["neurons"]]
    # without filters any neuron may be drawn: over many seeds some fail the filter
    unfiltered = [n for s in range(20) for n in congruence.random_neurons(
        m, [2], per_layer=4, seed=s, require_space=False, min_chars=0, reject=())["neurons"]]
    assert any(n["neuron"] not in passing[2] for n in unfiltered)
    with pytest.raises(HeadscopeError, match="random set"):
        congruence.random_neurons(m, [2], per_layer=3, min_chars=50)


def test_no_neuron_passes_says_so():
    m = tiny_model("gpt2")
    with pytest.raises(HeadscopeError, match="no neuron .* passes the filters.*try"):
        congruence.find_neurons(m, [2], per_layer=3, min_chars=50)


def test_centred_unembedding_equals_transformer_lens():
    """Our centred, folded W_U and centred W_out give TransformerLens' logit-lens of W_out after
    process_weights_(fold_ln, center_writing_weights, center_unembed) — the reference code's setting."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    m = tiny_model("gpt2")
    c = m.hf.config
    cfg = HookedTransformerConfig(d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_layers=c.n_layer, n_ctx=c.n_positions,
                                  n_heads=c.n_head, d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new",
                                  normalization_type="LN", eps=c.layer_norm_epsilon, device="cpu")
    tl = HookedTransformer(cfg)
    tl.load_state_dict(convert_gpt2_weights(m.hf, cfg), strict=False)
    tl.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    WU_tl = tl.W_U.detach().double().T                                             # [V, d]
    ours = congruence.folded_unembed(m).double()
    # TL's fold_ln also centres W_U over d (LayerNorm removes the residual's mean); we centre W_out
    # over d instead, which gives the same logits W_out·W_U. Over the vocabulary both are centred.
    torch.testing.assert_close(ours - ours.mean(1, keepdim=True), WU_tl, rtol=1e-5, atol=1e-6)
    for layer in range(c.n_layer):
        C = tl.W_out[layer].detach().double() @ tl.W_U.detach().double()           # [M, V]
        lc = congruence.layer_congruence(m, layer)
        np.testing.assert_array_equal(lc.token.numpy(), C.argmax(1).numpy())
        np.testing.assert_allclose(lc.dot.numpy(), C.max(1).values.numpy(), rtol=1e-4, atol=1e-5)
    raw = congruence.folded_unembed(m, "raw")
    assert not torch.allclose(raw, congruence.folded_unembed(m))                   # the convention matters
    with pytest.raises(HeadscopeError, match="unknown unembedding convention"):
        congruence.folded_unembed(m, "centered-ish")


def test_centring_shifts_dot_not_token_or_shape():
    """Centring W_U subtracts a per-neuron constant from every logit: same token, kurtosis and skew,
    dot moved by w_n · mean_t W_U[t] — so the ranking between neurons can change; the overlap report
    counts exactly that."""
    m = tiny_model("llama_gqa")
    cen, raw = (congruence.layer_congruence(m, 2, unembed=u) for u in ("centred", "raw"))
    assert torch_equal(cen.token, raw.token)
    np.testing.assert_allclose(cen.kurtosis.numpy(), raw.kurtosis.numpy(), rtol=1e-3)
    W_out, WU = _raw_weights(m, 2)
    np.testing.assert_allclose((raw.dot - cen.dot).numpy(), W_out @ WU.mean(0), rtol=1e-3, atol=1e-5)
    ov = congruence.top_set_overlap(m, [2], per_layer=5)["2"]
    a = set(np.argsort(-cen.dot.numpy())[:5].tolist()); b = set(np.argsort(-raw.dot.numpy())[:5].tolist())
    assert ov["overlap"] == len(a & b) and ov["jaccard"] == pytest.approx(len(a & b) / len(a | b))
    assert ov["spearman"] == pytest.approx(scipy.stats.spearmanr(cen.dot.numpy(), raw.dot.numpy()).statistic)


def torch_equal(a, b) -> bool:
    return bool((a == b).all())
