"""Reading a head in context (headscope.heads.in_context): the attended source and the ranks of the attended
token / the token after it in the head's direct logit contribution, against an independent numpy computation
(hooks of our own, no headscope capture) and a hand-built copying head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headscope.heads.in_context import RANK_CAP, read_in_context
from headscope.testing.tiny import tiny_model


def _independent(model, ids):
    """Per layer: z [S, H, Dh] (input of the output projection), patterns [H, S, S], and the final norm's input."""
    hf = model.hf
    got = {}
    hooks = [hf.transformer.ln_f.register_forward_pre_hook(lambda m, a: got.__setitem__("final", a[0][0].detach()))]
    for l, blk in enumerate(hf.transformer.h):
        hooks.append(blk.attn.c_proj.register_forward_pre_hook(
            lambda m, a, l=l: got.__setitem__(("z", l), a[0][0].detach())))
    try:
        hf.config._attn_implementation = "eager"
        out = hf(ids, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    return got, [a[0].detach() for a in out.attentions]


def test_dla_ranks_match_numpy_on_a_layernorm_model():
    model = tiny_model("gpt2")
    ids = model.to_tokens("the cat sat on the mat and the cat sat on the")
    res = read_in_context(model, ids, k=3)
    got, pats = _independent(model, ids)
    hf = model.hf
    S, H, Dh = ids.shape[1], model.n_heads, model.d_head
    x = got["final"].double().numpy()                                          # [S, d]
    xc = x - x.mean(-1, keepdims=True)
    inv = 1 / np.sqrt((xc ** 2).mean(-1, keepdims=True) + hf.transformer.ln_f.eps)
    gamma = hf.transformer.ln_f.weight.detach().double().numpy()
    WU = hf.lm_head.weight.detach().double().numpy()                           # [V, d]
    WU_c = WU - WU.mean(0, keepdims=True)                                      # centred over the vocabulary
    toks = ids[0].numpy()
    exact = 0
    for l in range(model.n_layers):
        Wo = hf.transformer.h[l].attn.c_proj.weight.detach().double().numpy()  # Conv1D: [H·Dh, d]
        z = got[("z", l)].double().numpy()                                     # [S, H·Dh]
        for h in range(H):
            rec = res[f"{l}.{h}"]
            r = z[:, h * Dh:(h + 1) * Dh] @ Wo[h * Dh:(h + 1) * Dh]               # [S, d]
            logits = ((r - r.mean(-1, keepdims=True)) * inv * gamma) @ WU_c.T     # [S, V]
            pat = pats[l][h].double().numpy()
            for t in range(1, S):
                s = 1 + int(np.argmax(pat[t, 1:t + 1]))
                assert rec["src"][t] == s and rec["weight"][t] == pytest.approx(pat[t, s], abs=1e-3)
                assert rec["bos"][t] == pytest.approx(pat[t, 0], abs=1e-3)
                assert rec["dla_rank_src"][t] == min(RANK_CAP, int((logits[t] >= logits[t, toks[s]]).sum()))
                exact += rec["dla_rank_src"][t] < RANK_CAP
                if s + 1 <= t:
                    assert rec["dla_rank_next"][t] == min(RANK_CAP, int((logits[t] >= logits[t, toks[s + 1]]).sum()))
                else:
                    assert rec["dla_rank_next"][t] is None                     # never a future token
                assert rec["dla_top"][t][0] == model.token_str([int(np.argmax(logits[t]))])[0]
            assert rec["src"][0] is None and rec["dla_top"][0] == []
    assert exact >= 20                                                          # not all capped


def _copying_model():
    """A llama-style tiny model whose head 0 of layer 0 copies: embeddings and unembeddings are the same
    unit vectors in the first Dh dimensions, its OV circuit is the identity there, and it attends sharply to
    occurrences of the current token (itself included)."""
    model = tiny_model("llama_gqa", seed=1)
    hf, Dh, d = model.hf, model.d_head, model.d_model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        U = torch.randn(model.d_vocab, Dh, generator=g)
        U = U / U.norm(dim=-1, keepdim=True)
        E = torch.zeros(model.d_vocab, d)
        E[:, :Dh] = U
        hf.model.embed_tokens.weight.copy_(E)
        hf.lm_head.weight.copy_(E)
        hf.model.norm.weight.fill_(1.0)
        a = hf.model.layers[0].self_attn
        hf.model.layers[0].input_layernorm.weight.fill_(1.0)
        a.v_proj.weight.zero_()
        a.v_proj.weight[:Dh, :Dh] = torch.eye(Dh)                               # kv group 0 reads u
        a.o_proj.weight.zero_()
        a.o_proj.weight[:Dh, :Dh] = torch.eye(Dh)                               # head 0 writes it back
        a.q_proj.weight.zero_()                                                 # q·k = β ⟨u_t, u_s⟩ (RoPE
        a.q_proj.weight[:Dh, :Dh] = 5.0 * torch.eye(Dh)                         # leaves offset 0 unrotated):
        a.k_proj.weight.zero_()                                                 # it attends to the same token
        a.k_proj.weight[:Dh, :Dh] = torch.eye(Dh)
    return model


def test_hand_built_copying_head_ranks_the_attended_token_first():
    model = _copying_model()
    ids = model.to_tokens("The cat sat on the mat. Then the dog ran to the park. The cat sat on the mat.")
    rec = read_in_context(model, ids, layers=[0])["0.0"]
    sharp = [t for t in range(1, ids.shape[1]) if rec["weight"][t] > 0.95]
    assert len(sharp) >= 5
    assert all(rec["dla_rank_src"][t] == 1 for t in sharp)
    assert rec["dla_top"][sharp[0]][0] == model.token_str([int(ids[0, rec["src"][sharp[0]]])])[0]
    # a head that writes nothing (o_proj zero for head 1) never ranks a token first (ties count against it)
    other = read_in_context(model, ids, layers=[0])["0.1"]
    assert all(other["dla_rank_src"][t] == RANK_CAP for t in range(1, ids.shape[1]))


def test_post_attention_norm_model_has_no_direct_logits_and_empty_request():
    """Gemma-2's r_h is not what reaches the residual stream: no direct-logit ranks, the rest is read."""
    model = tiny_model("gemma2")
    ids = model.to_tokens("the cat sat on the mat")
    rec = read_in_context(model, ids, heads=[(1, 2)])
    assert list(rec) == ["1.2"] and rec["1.2"]["dla_rank_src"] is None and rec["1.2"]["dla_top"] is None
    assert all(1 <= rec["1.2"]["src"][t] <= t for t in range(1, ids.shape[1]))
    assert read_in_context(model, ids, heads=[]) == {}
