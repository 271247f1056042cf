"""Capture and interventions on tiny models of every family, checked against direct computations."""

import dataclasses

import pytest
import torch

from headscope import HeadscopeError
from headscope.capture import HeadIntervention, NeuronIntervention, capture, run_with_interventions
from headscope.testing import tiny_model

IDS = torch.randint(1, 512, (2, 12), generator=torch.Generator().manual_seed(0))


def test_results_sum_to_projection_output(any_tiny):
    m = any_tiny
    c = capture(m, IDS, what=("result", "attn_out"))
    for layer in range(m.n_layers):
        b = m.b_O(layer)
        total = c["result"][layer].sum(2) + (b if b is not None else 0)
        torch.testing.assert_close(total, c["attn_out"][layer], atol=1e-5, rtol=1e-5)


def test_logits_without_intervention_equal_bare_model(any_tiny):
    m = any_tiny
    c = capture(m, IDS, what=("z", "result", "pattern", "v", "mlp_pre", "mlp_post", "resid_pre", "resid_post",
                              "logits", "logprobs"))
    with torch.no_grad():
        bare = m.hf(IDS).logits
    torch.testing.assert_close(c.logits, bare, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.logprobs.exp().sum(-1), torch.ones(2, 12), atol=1e-4, rtol=0)


def test_patterns_are_causal_and_match_eager_attentions(any_tiny):
    m = any_tiny
    c = capture(m, IDS, what=("pattern",))
    cur = m.hf.config._attn_implementation
    m.hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = m.hf(IDS, output_attentions=True).attentions
    finally:
        m.hf.set_attn_implementation(cur)
    assert m.hf.config._attn_implementation == cur  # capture restored the backend
    for layer in range(m.n_layers):
        p = c["pattern"][layer]
        assert p.shape == (2, m.n_heads, 12, 12)
        torch.testing.assert_close(p, ref[layer], atol=1e-6, rtol=1e-5)
        assert torch.triu(p, diagonal=1).abs().max() == 0
        torch.testing.assert_close(p.sum(-1), torch.ones(2, m.n_heads, 12), atol=1e-5, rtol=0)


def test_z_is_pattern_times_values_with_gqa_groups(any_tiny):
    """z_h[t] = Σ_s pattern_h[t, s] · v_{g(h)}[s]: checks the v layout and the GQA grouping."""
    m = any_tiny
    c = capture(m, IDS, what=("z", "pattern", "v"))
    for layer in range(m.n_layers):
        v = c["v"][layer]
        assert v.shape == (2, 12, m.n_kv_heads, m.d_head)
        for h in range(m.n_heads):
            z = torch.einsum("bts,bsd->btd", c["pattern"][layer][:, h], v[:, :, m.kv_group(h)])
            torch.testing.assert_close(z, c["z"][layer][:, :, h], atol=1e-5, rtol=1e-4)


def test_mlp_activations_are_the_down_projection_input(any_tiny):
    m = any_tiny
    what = ("mlp_pre", "mlp_post") + (("mlp_up",) if m.arch.mlp_kind == "gated" else ())
    c = capture(m, IDS, what=what + ("resid_post",))
    layer = 1
    act = m.mlp_act(layer)
    if m.arch.mlp_kind == "gated":
        expect = act(c["mlp_pre"][layer]) * c["mlp_up"][layer]
    else:
        expect = act(c["mlp_pre"][layer])
    torch.testing.assert_close(c["mlp_post"][layer], expect, atol=1e-5, rtol=1e-4)
    assert c["mlp_post"][layer].shape == (2, 12, m.d_mlp)


def test_zero_ablation_removes_exactly_that_head(any_tiny):
    m = any_tiny
    base = capture(m, IDS, what=("result", "attn_out"))
    abl = capture(m, IDS, what=("attn_out", "z"), interventions=[HeadIntervention(1, [2], "zero")])
    assert abl["z"][1][:, :, 2].abs().max() == 0
    torch.testing.assert_close(abl["attn_out"][1], base["attn_out"][1] - base["result"][1][:, :, 2], atol=1e-5,
                               rtol=1e-4)


def test_scale_mean_patch_add_interventions():
    m = tiny_model("llama_gqa")
    other = torch.randint(1, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    base = capture(m, IDS, what=("z", "result", "attn_out"))
    # scale
    sc = capture(m, IDS, what=("attn_out",), interventions=[HeadIntervention(0, [1], "scale", 3.0)])
    torch.testing.assert_close(sc["attn_out"][0], base["attn_out"][0] + 2 * base["result"][0][:, :, 1], atol=1e-5,
                               rtol=1e-4)
    # mean: a [H, Dh] mean z replaces the head's z at every position
    mean = base["z"][0].mean((0, 1))
    mn = capture(m, IDS, what=("z",), interventions=[HeadIntervention(0, [3], "mean", mean)])
    torch.testing.assert_close(mn["z"][0][:, :, 3], mean[3].expand(2, 12, -1))
    # patch every head of layer 1 from another run: layer 1's attention output becomes the other run's
    src = capture(m, other, what=("z", "attn_out"))
    pt = capture(m, IDS, what=("attn_out",), interventions=[HeadIntervention(1, None, "patch", src["z"][1])])
    torch.testing.assert_close(pt["attn_out"][1], src["attn_out"][1], atol=1e-5, rtol=1e-4)
    # add a residual-space vector to one head's output at the last position only
    vec = torch.randn(m.d_model)
    ad = capture(m, IDS, what=("attn_out",), interventions=[HeadIntervention(2, [0], "add", vec, positions=-1)])
    torch.testing.assert_close(ad["attn_out"][2][:, -1], base["attn_out"][2][:, -1] + vec, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ad["attn_out"][2][:, :-1], base["attn_out"][2][:, :-1])


def test_neuron_interventions():
    m = tiny_model("gpt2")
    base = capture(m, IDS, what=("mlp_post", "logits"))
    z = capture(m, IDS, what=("mlp_post", "logits"), interventions=[NeuronIntervention(1, [5, 7], "zero")])
    assert z["mlp_post"][1][..., [5, 7]].abs().max() == 0
    torch.testing.assert_close(z["mlp_post"][1][..., :5], base["mlp_post"][1][..., :5])
    assert not torch.allclose(z.logits, base.logits)
    s = capture(m, IDS, what=("mlp_post",), interventions=[NeuronIntervention(1, [3], "scale", 0.5)])
    torch.testing.assert_close(s["mlp_post"][1][..., 3], 0.5 * base["mlp_post"][1][..., 3])
    # direct effect of zeroing neuron n on layer-1 MLP output is −act·W_out[n]
    logits = run_with_interventions(m, IDS, [NeuronIntervention(2, [0], "zero")])
    assert logits.shape == (2, 12, m.d_vocab)


def test_reduce_inside_hook_and_stop_after():
    m = tiny_model("neox_parallel")
    c = capture(m, IDS, what=("result",), reduce={"result": lambda layer, r: r[:, -1]}, stop_after=1,
                layers=[0, 1])
    assert c.stopped_at == 1 and c.logits is None
    assert c["result"][0].shape == (2, m.n_heads, m.d_model)


def test_bad_inputs_are_one_line_errors():
    m = tiny_model("gpt2")
    with pytest.raises(HeadscopeError, match="layer 7 is out of range"):
        capture(m, IDS, layers=[7])
    with pytest.raises(HeadscopeError, match="head 9 is out of range"):
        capture(m, IDS, interventions=[HeadIntervention(0, [9])])
    with pytest.raises(HeadscopeError, match="exceeds the context"):
        capture(m, torch.zeros(1, 200, dtype=torch.long))
    with pytest.raises(HeadscopeError, match="unknown capture name"):
        capture(m, IDS, what=("attention",))
    with pytest.raises(HeadscopeError, match="unknown intervention kind"):
        capture(m, IDS, interventions=[HeadIntervention(0, [0], "erase")])
    with pytest.raises(HeadscopeError, match="only for gated"):
        capture(m, IDS, what=("mlp_up",))


def test_a_hook_that_never_fires_is_an_error():
    m = tiny_model("gpt2")
    for layer in range(m.n_layers):
        m.block(layer).unused = torch.nn.Linear(32, 32)
    m.arch = dataclasses.replace(m.arch, o_proj="unused")
    with pytest.raises(HeadscopeError, match="hooks never fired"):
        capture(m, IDS, what=("z",))


# -- resume: start the pass at block L from a saved residual stream ------------------------------------
@pytest.mark.parametrize("L", [1, 2])
def test_resume_equals_the_full_pass_with_the_same_edit(any_tiny, L):
    """A pass resumed at L from the clean resid_pre of L, with a head edit at L, gives the logits and the
    per-layer tensors of the full pass with that edit (blocks below L are skipped, not approximated)."""
    m = any_tiny
    clean = capture(m, IDS, layers=[L], what=("resid_pre",))
    ivs = [HeadIntervention(L, heads=[1], kind="zero")]
    full = capture(m, IDS, layers=list(range(L, m.n_layers)), what=("z", "mlp_post", "logprobs"), interventions=ivs)
    res = capture(m, IDS, layers=list(range(L, m.n_layers)), what=("z", "mlp_post", "logprobs"), interventions=ivs,
                  resume=(L, clean["resid_pre"][L]))
    torch.testing.assert_close(res.logprobs, full.logprobs, atol=1e-5, rtol=1e-5)
    for l in range(L, m.n_layers):
        torch.testing.assert_close(res["z"][l], full["z"][l], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res["mlp_post"][l], full["mlp_post"][l], atol=1e-5, rtol=1e-5)
    # the blocks are restored: a later plain pass is the bare model
    with torch.no_grad():
        torch.testing.assert_close(capture(m, IDS, layers=[], what=("logits",)).logits, m.hf(IDS).logits)


def test_resume_really_skips_the_lower_blocks(any_tiny):
    """What block L reads is the given stream, not the embedding's path: a different stream changes the
    output, and no hook below L fires."""
    m = any_tiny
    h = capture(m, IDS, layers=[2], what=("resid_pre",))["resid_pre"][2]
    capture(m, IDS, layers=[], what=("logits",), resume=(1, capture(m, IDS, layers=[1], what=("resid_pre",))["resid_pre"][1]))
    calls = []  # (the first resume of a model runs block 0 once on one token, to see its output type)
    handle = m.block_module(0, m.arch.o_proj).register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        a = capture(m, IDS, layers=[], what=("logits",), resume=(2, h)).logits
        b = capture(m, IDS, layers=[], what=("logits",), resume=(2, h + 1.0)).logits
    finally:
        handle.remove()
    assert not torch.allclose(a, b)
    assert calls == []  # block 0's attention never ran
    with torch.no_grad():
        torch.testing.assert_close(a, m.hf(IDS).logits, atol=1e-5, rtol=1e-5)


def test_resume_refuses_what_it_cannot_stand_for(any_tiny):
    m = any_tiny
    h = capture(m, IDS, layers=[2], what=("resid_pre",))["resid_pre"][2]
    with pytest.raises(HeadscopeError, match="below"):
        capture(m, IDS, layers=[1], what=("z",), resume=(2, h))
    with pytest.raises(HeadscopeError, match="below"):
        capture(m, IDS, layers=[], what=("logits",), resume=(2, h), interventions=[HeadIntervention(0, heads=[0])])
    with pytest.raises(HeadscopeError, match="d_model"):
        capture(m, IDS, layers=[], what=("logits",), resume=(2, h[:1]))
