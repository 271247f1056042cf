"""Head → neuron attribution equals the actual change in the neuron's pre-activation (standard MLPs,
exactly) or activation (gated MLPs, to first order) when the head's direct contribution is removed
with the pre-MLP norm's scale held fixed; eligibility; active-head thresholds."""

import numpy as np
import pytest
import torch

from headscope.capture import HeadIntervention, capture
from headscope.models.arch import get_path
from headscope.neurons import attribution
from headscope.testing.tiny import tiny_model


class FrozenScale(torch.nn.Module):
    """Wraps a norm: ``record`` mode stores the input's σ; ``frozen`` mode applies the recorded σ."""

    def __init__(self, norm, layernorm):
        super().__init__()
        self.norm, self.layernorm, self.mode, self.sigma = norm, layernorm, "record", None
        self.eps = attribution.norm_eps(norm)

    def _sigma(self, x):
        if self.layernorm:
            return torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + self.eps)
        return torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        y = self.norm(x)
        s = self._sigma(x)
        if self.mode == "record":
            self.sigma = s.detach()
            return y
        beta = getattr(self.norm, "bias", None)
        if self.layernorm and beta is not None:
            return (y - beta) * s / self.sigma + beta
        return y * s / self.sigma


def _freeze(m, layer, name=None):
    blk = m.block(layer)
    name = name or m.arch.ln_mlp
    wrapper = FrozenScale(get_path(blk, name), m.arch.norm_kind == "layernorm")
    setattr(blk, name, wrapper)
    return wrapper


def _setup(family, seed=1):
    m = tiny_model(family, seed=seed)
    m.hf.double()
    return m


def _measure(m, ids, layer, neuron, what, ivs=()):
    cap = capture(m, ids, layers=[layer], what={what}, interventions=ivs)
    return float(cap[what][layer][0, -1, neuron])


@pytest.mark.parametrize("family", ["gpt2", "neox_sequential", "neox_parallel"])
def test_standard_mlp_attribution_is_exact_change_in_pre_activation(family):
    m = _setup(family)
    layer, neuron = 2, 5
    ids = torch.tensor([[0, 17, 250, 33, 401, 99, 7, 300]])
    A = attribution.attribute_prompts(m, ids.tolist(), [layer], [neuron], progress=False)[0]
    frozen = _freeze(m, layer)
    clean = capture(m, ids, layers=range(3), what={"result", "mlp_pre"})
    pre = float(clean["mlp_pre"][layer][0, -1, neuron])
    frozen.mode = "frozen"
    # remove the head's direct contribution from the MLP's input only: subtract r_h where it enters
    # the residual stream read by the MLP (this layer's attention output, or the previous layer's
    # when attention and MLP run in parallel)
    at = layer - 1 if m.parallel else layer
    checked = 0
    for k in attribution.eligible_layers(m, layer):
        for h in range(m.n_heads):
            r = clean["result"][k][0, -1, h]
            iv = HeadIntervention(layer=at, heads=None, kind="add", value=-r, positions=[ids.shape[1] - 1])
            change = pre - _measure(m, ids, layer, neuron, "mlp_pre", [iv])
            assert A[k * m.n_heads + h].item() == pytest.approx(change, rel=1e-4, abs=1e-6)
            checked += 1
    assert checked == len(attribution.eligible_layers(m, layer)) * m.n_heads
    assert torch.isnan(A[len(attribution.eligible_layers(m, layer)) * m.n_heads:]).all()


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2"])
@pytest.mark.parametrize("mode", ["full", "gate", "up"])
def test_gated_mlp_attribution_is_first_order_change_in_activation(family, mode):
    m = _setup(family)
    layer, neuron = 2, 3
    ids = torch.tensor([[0, 17, 250, 33, 401, 99, 7]])
    A = attribution.attribute_prompts(m, ids.tolist(), [layer], [neuron], gated=mode, progress=False)[0]
    full = attribution.attribute_prompts(m, ids.tolist(), [layer], [neuron], gated="full", progress=False)[0]
    other = attribution.attribute_prompts(m, ids.tolist(), [layer], [neuron],
                                          gated="up" if mode == "gate" else "gate", progress=False)[0]
    frozen = _freeze(m, layer)
    clean = capture(m, ids, layers=range(3), what={"result", "mlp_post", "mlp_pre", "mlp_up"})
    frozen.mode = "frozen"
    eps, last = 1e-2, ids.shape[1] - 1  # the RMSNorms compute in float32: a larger step
    # the two terms, written out from the raw weights: the head's contribution ρ enters the MLP as
    # γ ⊙ ρ / σ (σ recorded on the clean run); through the gate it moves g by δ_g = ⟨γ⊙ρ/σ, W_gate[:, n]⟩
    # (the activation then changes by act(g + δ_g)·u − act(g)·u, a finite difference here), through the
    # up projection it moves u by δ_u = ⟨γ⊙ρ/σ, W_up[:, n]⟩ (the activation by act(g)·δ_u)
    W_gate, W_up = m.W_gate(layer).double(), m.W_in(layer).double()
    gamma = m.norm_gain(frozen.norm).double()
    sigma = float(frozen.sigma[0, -1, 0])
    g0, u0 = float(clean["mlp_pre"][layer][0, -1, neuron]), float(clean["mlp_up"][layer][0, -1, neuron])
    act = m.mlp_act(layer)
    f = lambda x: float(act(torch.tensor(x, dtype=torch.float64)))
    checked = 0
    for k in (0, 2):
        for h in range(m.n_heads):
            r = clean["result"][k][0, -1, h]
            if mode == "full":
                plus = _measure(m, ids, layer, neuron, "mlp_post", [HeadIntervention(layer, None, "add", eps * r, [last])])
                minus = _measure(m, ids, layer, neuron, "mlp_post", [HeadIntervention(layer, None, "add", -eps * r, [last])])
                expect = (plus - minus) / (2 * eps)
            else:
                rho = gamma * r.double() / sigma
                if mode == "gate":
                    dg = float(rho @ W_gate[:, neuron])
                    expect = (f(g0 + eps * dg) - f(g0 - eps * dg)) * u0 / (2 * eps)
                else:
                    expect = f(g0) * float(rho @ W_up[:, neuron])
            assert A[k * m.n_heads + h].item() == pytest.approx(expect, rel=2e-3, abs=1e-7)
            checked += 1
    assert checked == 2 * m.n_heads
    if mode != "full":  # the gate-only and up-only terms sum to the full first-order term
        ok = ~torch.isnan(full)
        torch.testing.assert_close((A + other)[ok], full[ok], rtol=1e-5, atol=1e-8)
        assert not torch.allclose(A[ok], full[ok])


def test_gemma2_same_layer_heads_through_post_attention_norm():
    """Gemma-2's post-attention norm is linearised at its actual scale (σ_post held fixed, like the
    pre-MLP norm's σ): with both scales frozen, A is the first-order change in the activation."""
    m = _setup("gemma2")
    layer, neuron = 2, 4
    ids = torch.tensor([[0, 17, 250, 33, 401, 99]])
    A = attribution.attribute_prompts(m, ids.tolist(), [layer], [neuron], progress=False)[0]
    frozen = [_freeze(m, layer), _freeze(m, layer, m.arch.post_attn_norm)]
    clean = capture(m, ids, layers=[layer], what={"result"})
    for f in frozen:
        f.mode = "frozen"
    eps, last = 1e-2, ids.shape[1] - 1  # the RMSNorms compute in float32: a larger step
    for h in range(m.n_heads):
        r = clean["result"][layer][0, -1, h]
        plus = _measure(m, ids, layer, neuron, "mlp_post", [HeadIntervention(layer, None, "add", eps * r, [last])])
        minus = _measure(m, ids, layer, neuron, "mlp_post", [HeadIntervention(layer, None, "add", -eps * r, [last])])
        assert A[layer * m.n_heads + h].item() == pytest.approx((plus - minus) / (2 * eps), rel=1e-3, abs=1e-7)


def test_eligibility_parallel_vs_sequential():
    assert attribution.eligible_layers(tiny_model("neox_parallel"), 2) == [0, 1]
    assert attribution.eligible_layers(tiny_model("neox_sequential"), 2) == [0, 1, 2]
    assert attribution.eligible_layers(tiny_model("gpt2"), 0) == [0]
    assert attribution.eligible_layers(tiny_model("neox_parallel"), 0) == []


def test_batched_prompts_of_different_lengths_match_one_at_a_time():
    m = tiny_model("llama_gqa")
    rows = [[0, 5, 9, 200, 31], [0, 44, 2], [0, 7, 8, 9, 10, 11, 12, 13], [0, 99, 98]]
    layers, neurons = [2, 1, 2, 0], [3, 7, 40, 1]
    batched = attribution.attribute_prompts(m, rows, layers, neurons, batch_size=3, progress=False)
    for i in range(len(rows)):
        one = attribution.attribute_prompts(m, [rows[i]], [layers[i]], [neurons[i]], progress=False)[0]
        torch.testing.assert_close(batched[i], one, rtol=1e-4, atol=1e-6, equal_nan=True)


def test_norm_scale_only_rescales_per_prompt():
    m = tiny_model("gpt2")
    rows = [[0, 5, 9, 200, 31], [0, 44, 2, 8]]
    a = attribution.attribute_prompts(m, rows, [2, 2], [3, 3], apply_norm_scale=True, progress=False)
    b = attribution.attribute_prompts(m, rows, [2, 2], [3, 3], apply_norm_scale=False, progress=False)
    ok = ~torch.isnan(a)
    ratio = (b[ok] / a[ok]).reshape(2, -1)
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4, atol=0)
    assert torch.equal(attribution.active_heads(a), attribution.active_heads(b))


def test_active_heads_threshold_matches_numpy():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(50, 20, generator=g) ** 3
    A[:, 15:] = float("nan")                    # ineligible heads
    A[3, 2] = 100.0                             # one clear outlier
    act = attribution.active_heads(A, 2.0)
    x = A[:, :15].numpy()
    thr = x.mean(1, keepdims=True) + 2 * x.std(1, keepdims=True)
    np.testing.assert_array_equal(act[:, :15].numpy(), x > thr)
    assert not act[:, 15:].any() and act[3, 2]
    frac, explain = attribution.heads_to_explain(act, torch.ones(50, dtype=torch.bool))
    np.testing.assert_allclose(frac.numpy(), (x > thr).mean(0).tolist() + [0] * 5, rtol=1e-6)
    assert torch.equal(explain, (frac >= 0.25) & (frac <= 0.75))
    # the 25–75 % bounds are inclusive and only valid prompts count
    act2 = torch.zeros(8, 3, dtype=torch.bool)
    act2[:2, 0] = True; act2[:6, 1] = True; act2[:7, 2] = True
    valid = torch.ones(8, dtype=torch.bool)
    frac2, ex2 = attribution.heads_to_explain(act2, valid)
    assert frac2.tolist() == [0.25, 0.75, 0.875] and ex2.tolist() == [True, True, False]
    valid[6:] = False
    frac3, ex3 = attribution.heads_to_explain(act2, valid)
    assert frac3.tolist() == pytest.approx([2 / 6, 1.0, 1.0])


@pytest.mark.parametrize("family,mode", [("gpt2", "z"), ("llama_gqa", "z"), ("llama_gqa", "value")])
def test_batched_ablation_equals_per_pair_loop(family, mode):
    """Batching over pairs and prompts (per-row head masks) gives the plain per-pair loop's drops, and
    the loop's drops are P_clean − P_ablated computed with a single HeadIntervention."""
    from headscope.neurons import ablation
    m = tiny_model(family)
    g = torch.Generator().manual_seed(0)
    prompts = [[[0] + torch.randint(1, 500, (n,), generator=g).tolist() for n in (3, 7, 5, 9)],
               [[0] + torch.randint(1, 500, (n,), generator=g).tolist() for n in (6, 4, 8)]]
    tokens = [11, 42]
    pairs = [{"neuron": 0, "layer": 0, "head": 1}, {"neuron": 1, "layer": 2, "head": 0},
             {"neuron": 0, "layer": 2, "head": 3}, {"neuron": 1, "layer": 1, "head": 2},
             {"neuron": 0, "layer": 2, "head": 0}]   # two heads of one layer share resumed batches
    batched = ablation.ablation_drops(m, pairs, prompts, tokens, batch_size=5, progress=False, mode=mode)
    loop = ablation.ablation_drops_per_pair(m, pairs, prompts, tokens, batch_size=2, progress=False, mode=mode)
    grouped = ablation.ablation_drops(m, pairs, prompts, tokens, batch_size=5, progress=False, mode=mode,
                                      resid_bytes=1)   # one neuron per group of kept streams
    for b, l, g in zip(batched, loop, grouped):
        torch.testing.assert_close(b, l, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g, l, rtol=1e-4, atol=1e-6)
    p = pairs[1]
    ids = torch.tensor([prompts[1][2]])
    heads = ablation.ablated_heads(m, p["head"], mode)
    clean = capture(m, ids, layers=[], what={"logprobs"}).logprobs[0, -1, tokens[1]].exp()
    abl = capture(m, ids, layers=[], what={"logprobs"},
                  interventions=[HeadIntervention(p["layer"], heads, "zero")]).logprobs[0, -1, tokens[1]].exp()
    assert batched[1][2].item() == pytest.approx((clean - abl).item(), abs=1e-6)
    assert any(d.abs().max() > 1e-6 for d in batched)          # ablations change something
