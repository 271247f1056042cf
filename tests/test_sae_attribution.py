"""DFA sums to the linear pre-activation (every family, GQA included), recursive DFA sums to DFA,
weight attribution and the polysemanticity criterion."""

import numpy as np
import pytest
import torch

from headscope.capture import capture
from headscope.errors import HeadscopeError
from headscope.sae.attribution import dfa, head_features, recursive_dfa, weight_attribution
from headscope.sae.model import AttnSAE, SAEConfig
from headscope.testing.tiny import FAMILIES, tiny_model


def _sae(model, layer=2, d_sae=16, seed=1):
    cfg = SAEConfig(d_in=model.n_heads * model.d_head, d_sae=d_sae, n_heads=model.n_heads, d_head=model.d_head,
                    layer=layer, architecture="standard", model=model.identity())
    sae = AttnSAE(cfg, seed=seed)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    return sae


@pytest.mark.parametrize("family", FAMILIES)
def test_dfa_sums_to_linear_preactivation_and_rdfa_to_dfa(family):
    model = tiny_model(family)
    sae = _sae(model)
    ids = model.to_tokens(["The quick brown fox jumps over the lazy dog again", "hello world"])
    d = dfa(model, sae, ids)                                                   # [B, T, S, H, F]
    assert d.shape == (2, ids.shape[1], ids.shape[1], model.n_heads, 16)
    z = capture(model, ids, layers=[2], what=("z",))["z"][2].reshape(2, ids.shape[1], -1)
    with torch.no_grad():
        pre = sae.pre_acts(z)
        const = sae.b_enc - sae.b_dec @ sae.W_enc
    assert torch.allclose(d.sum((2, 3)) + const, pre, atol=1e-4)
    # causal: no attribution to future sources
    assert d[0, 2, 3:].abs().max() == 0
    if model.arch.post_attn_norm:
        with pytest.raises(HeadscopeError, match="post-attention norm"):
            recursive_dfa(model, sae, ids[0], dest=5, feature=3)
        return
    r = recursive_dfa(model, sae, ids[0], dest=5, feature=3)
    want = dfa(model, sae, ids[:1], features=[3], dest=5)[0, 0, :, :, 0].sum(-1)
    assert torch.allclose(r.values.sum(0), want, atol=1e-5)
    assert r.values.shape == (len(r.names), ids.shape[1])
    assert "embed" in r.names and "L1H3" in r.names and "L0.mlp" in r.names


def test_weight_attribution_and_polysemanticity():
    model = tiny_model("gpt2")
    sae = _sae(model, d_sae=8)
    W = sae.W_dec.detach().numpy().reshape(8, model.n_heads, model.d_head)
    n = np.linalg.norm(W, axis=-1)
    assert np.allclose(weight_attribution(sae).numpy(), n / n.sum(1, keepdims=True), atol=1e-6)
    # features 0–3 live only in head 0: 0 and 1 share a direction, 2 and 3 are orthogonal to them and each other
    with torch.no_grad():
        sae.W_dec.zero_()
        blocks = sae.W_dec.view(8, model.n_heads, model.d_head)
        e = torch.eye(model.d_head)
        blocks[0, 0], blocks[1, 0], blocks[2, 0], blocks[3, 0] = e[0], e[0] * 0.9 + e[1] * 0.1, e[2], e[3]
        for f in range(4, 8):
            blocks[f, 1 + f % 3] = e[f % model.d_head]
        sae.normalize_decoder()
    hf = head_features(model, sae, top_n=4, token_jaccard=1.1)  # decoder-direction criterion only
    top0 = {t["feature"] for t in hf[0]["top_features"]}
    assert top0 == {0, 1, 2, 3}
    assert hf[0]["n_groups"] == 3 and hf[0]["polysemantic"]
    assert sorted(map(sorted, hf[0]["groups"])) == [[0, 1], [2], [3]]
    alive = torch.tensor([True, True, False, False, True, True, True, True])
    hf = head_features(model, sae, alive=alive, top_n=4, token_jaccard=1.1)
    assert {t["feature"] for t in hf[0]["top_features"]} == {0, 1} and hf[0]["n_groups"] == 1
    assert not hf[0]["polysemantic"]


@pytest.mark.parametrize("arch", ["jumprelu", "gated", "matryoshka_batchtopk"])
def test_dfa_sums_to_linear_preactivation_every_architecture(arch):
    """DFA attributes the linear part of the encoder: for gated SAEs the magnitude path
    (W_enc ⊙ exp(r_mag)), whose ReLU gives the feature's value when the gate is open."""
    model = tiny_model("llama_gqa")
    cfg = SAEConfig(d_in=model.n_heads * model.d_head, d_sae=16, n_heads=model.n_heads, d_head=model.d_head,
                    layer=1, architecture=arch, k=4, model=model.identity())
    sae = AttnSAE(cfg, seed=3)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = model.to_tokens(["a short prompt about heads"])
    d = dfa(model, sae, ids)
    z = capture(model, ids, layers=[1], what=("z",))["z"][1].reshape(1, ids.shape[1], -1)
    with torch.no_grad():
        pre = sae.pre_acts(z)
        W = sae.head_blocks("enc").reshape(cfg.d_in, -1)
        const = pre - (z - 0) @ W
    assert torch.allclose(d.sum((2, 3)) + const, pre, atol=1e-4)
    assert torch.allclose(const, const[:, :1].expand_as(const), atol=1e-4)   # the rest is a constant
