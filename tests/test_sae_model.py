"""SAE model: shapes, decoder norms, loss decrease, TopK sparse decode, bad input."""

import pytest
import torch

from headscope.errors import HeadscopeError
from headscope.sae.model import AttnSAE, SAEConfig


def _cfg(arch="standard", d_sae=64, k=4):
    return SAEConfig(d_in=32, d_sae=d_sae, n_heads=4, d_head=8, layer=1, architecture=arch, k=k)


def _sparse_data(n=4096, d=32, n_dirs=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_dirs, d, generator=g)
    coef = torch.rand(n, n_dirs, generator=g) * (torch.rand(n, n_dirs, generator=g) < 0.06)
    return coef @ dirs


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk"])
def test_shapes_norms_and_loss_decreases(arch):
    sae = AttnSAE(_cfg(arch))
    x = _sparse_data()
    out = sae(x[:10])
    assert out.recon.shape == (10, 32) and out.acts.shape == (10, 64) and out.pre.shape == (10, 64)
    assert sae(x[:10].reshape(10, 4, 8)).recon.shape == (10, 32)  # [N, H, Dh] accepted
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    first = None
    for step in range(80):
        b = x[(step * 128) % 4096:][:128]
        o = sae.train_forward(b)
        ls = sae.loss(b, o, l1_coeff=0.05, l0_coeff=0.01, dead=torch.zeros(64, dtype=torch.bool))
        loss = ls["loss"]
        first = first if first is not None else ls["mse"].item()
        opt.zero_grad()
        loss.backward()
        sae.remove_parallel_grad()
        par = (sae.W_dec.grad * sae.W_dec).sum(1)
        assert par.abs().max() < 1e-5  # parallel gradient component removed
        opt.step()
        sae.normalize_decoder()
        sae.after_step(o)
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    assert ls["mse"].item() < 0.5 * first
    if arch == "topk":
        assert int((o.acts > 0).sum(-1).max()) <= 4
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        assert int((o.acts > 0).sum()) <= 4 * 128          # k·N over the batch while training
        assert sae.threshold.min() > 0                      # the inference threshold was learned
        l0 = (sae.encode(x[:1024]) > 0).float().sum(-1).mean()
        assert 1 < l0 < 12                                  # and gives about k at inference
    if arch == "jumprelu":
        assert (sae.threshold >= 0).all() and not torch.allclose(sae.threshold, torch.full((64,), 0.01))


def test_topk_sparse_decode_matches_dense_and_aux_loss():
    sae = AttnSAE(_cfg("topk", k=5), seed=3)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(20, 32)
    out = sae(x)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    v, i = pre.topk(5, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, i, v.relu())
    assert torch.allclose(out.acts, dense)
    assert torch.allclose(out.recon, dense @ sae.W_dec + sae.b_dec, atol=1e-5)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    l = sae.loss(x, out, dead=dead, k_aux=4)
    # independent AuxK: top-4 dead pre-activations reconstruct the residual
    pd = pre[:, :10]
    v2, i2 = pd.topk(4, dim=-1)
    a2 = torch.zeros_like(pd).scatter(-1, i2, v2.relu())
    want = ((a2 @ sae.W_dec[:10]) - (x - out.recon)).pow(2).sum(-1).mean()
    assert torch.allclose(l["aux"], want, rtol=1e-4)


def test_bad_inputs():
    with pytest.raises(HeadscopeError, match="d_in"):
        SAEConfig(d_in=30, d_sae=8, n_heads=4, d_head=8, layer=0)
    with pytest.raises(HeadscopeError, match="architecture"):
        _cfg("mystery")
    with pytest.raises(HeadscopeError, match="k must"):
        _cfg("topk", d_sae=8, k=9)
    with pytest.raises(HeadscopeError, match="width d_in=32"):
        AttnSAE(_cfg())(torch.randn(3, 31))


def test_batchtopk_and_jumprelu_match_saelens_training_functions():
    """BatchTopK's training activations and JumpReLU's straight-through gradients equal SAELens'."""
    from sae_lens.saes.batchtopk_sae import BatchTopK
    from sae_lens.saes.jumprelu_sae import JumpReLU, Step
    sae = AttnSAE(_cfg("batchtopk", k=3), seed=1)
    x = torch.randn(50, 32)
    out = sae.train_forward(x)
    assert torch.equal(out.acts, BatchTopK(3)(out.pre))
    assert int((out.acts > 0).sum()) == 150 and not torch.equal((out.acts > 0).sum(-1), torch.full((50,), 3))
    jr = AttnSAE(_cfg("jumprelu"), seed=2)
    with torch.no_grad():
        jr.threshold.uniform_(0.0, 0.3)
    jr.bandwidth = 0.05
    pre = torch.randn(40, 64) * 0.3
    gout = torch.randn(40, 64)
    ours, theirs = [], []
    for fn in ("ours", "theirs"):
        p_ = pre.clone().requires_grad_()
        th = jr.threshold.detach().clone().requires_grad_()
        if fn == "ours":
            from headscope.sae.model import _JumpReLU, _Step
            a, s_ = _JumpReLU.apply(p_, th, 0.05), _Step.apply(p_, th, 0.05)
        else:
            a, s_ = JumpReLU.apply(p_, th, 0.05, False), Step.apply(p_, th, 0.05, False)
        ((a * gout).sum() + s_.sum(-1).mean()).backward()
        (ours if fn == "ours" else theirs).extend([a.detach(), p_.grad, th.grad])
    for o, t in zip(ours, theirs):
        assert torch.allclose(o, t, atol=1e-6)
    assert ours[2].abs().sum() > 0


def test_matryoshka_inner_losses():
    sae = AttnSAE(SAEConfig(d_in=32, d_sae=64, n_heads=4, d_head=8, layer=1, architecture="matryoshka_batchtopk",
                            k=6, matryoshka_widths=[8, 24]), seed=4)
    assert sae.cfg.matryoshka_widths == [8, 24, 64]
    x = torch.randn(30, 32)
    out = sae.train_forward(x)
    l = sae.loss(x, out)
    for w in (8, 24):   # independent: the prefix of width w alone reconstructs x
        rec = out.acts[:, :w] @ sae.W_dec[:w] + sae.b_dec
        assert torch.allclose(l[f"mse_{w}"], (rec - x).pow(2).sum(-1).mean(), rtol=1e-5)
    assert torch.allclose(l["loss"], l["mse"] + l["mse_8"] + l["mse_24"], rtol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_training_step_equals_dense(arch):
    """The sparse kernels (one dense matmul per step) give the dense computation's loss and gradients,
    AuxK included."""
    torch.manual_seed(0)
    sae = AttnSAE(_cfg(arch, k=5), seed=5).double()
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.1)
    x = torch.randn(40, 32, dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::5] = True
    grads = []
    for sparse in (True, False):
        sae.zero_grad()
        o = sae.train_forward(x, sparse=sparse)
        assert (o.ent is not None) == sparse
        ls = sae.loss(x, o, dead=dead, k_aux=7)
        ls["loss"].backward()
        grads.append((ls["loss"].detach(), ls["aux"].detach(), o.recon.detach(), o.acts.clone(), o.fired(), o.l0(),
                      [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]))
    (l1, a1, r1, f1, c1, z1, g1), (l2, a2, r2, f2, c2, z2, g2) = grads
    assert a1 > 0 and torch.allclose(l1, l2) and torch.allclose(a1, a2) and torch.allclose(r1, r2)
    assert torch.allclose(f1, f2) and torch.equal(c1, c2) and z1 == pytest.approx(z2)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-10), (a - b).abs().max()


def test_batch_topk_candidates_exact():
    """The candidate search equals a top-n over the whole matrix, including the fallback when one row
    holds more than its share (and with many zeros)."""
    from headscope.sae.model import _batch_topk_flat
    g = torch.Generator().manual_seed(0)
    r = torch.randn(64, 200, generator=g).relu()
    r[5] += 10.0                                   # row 5 holds far more than 4·n/N of the top entries
    pre = torch.randn(64, 200, generator=g)
    tied = pre.clone()
    n = 3 * 64
    cut = float(pre.flatten().topk(n).values[-1])
    tied[tied > 0.8 * cut] = tied[tied > 0.8 * cut].round(decimals=1)   # ties at the cut: the guess path must give up
    cases = [(r, 0.0), (torch.randn(64, 200, generator=g).relu(), 0.0), (torch.zeros(64, 200), 0.0),
             (pre, 0.0), (pre, 0.8 * cut),     # the guess path (training's: a guess below the cut)
             (pre, 1.2 * cut),                 # guess above the cut: fewer than n pass it
             (pre, 0.05 * cut),                # guess far below: more than 4n pass it
             (tied, 0.8 * cut)]
    for m, guess in cases:
        got = _batch_topk_flat(m, n, guess)
        want = m.relu().flatten().topk(n).indices
        assert got.numel() == n and torch.equal(torch.sort(m.relu().flatten()[got]).values,
                                                torch.sort(m.relu().flatten()[want]).values)
        assert torch.equal(got, got.sort().values) and got.unique().numel() == n
        if guess == 0.8 * cut and m is pre:   # no ties: the very same set
            assert torch.equal(got, want.sort().values)


def test_architecture_registry_is_the_one_list():
    """One module per architecture, one registry: the model, the trainer (TRAINABLE: the CLI's choices)
    and the SAELens IO read it; every architecture's parameters are created and named by its object."""
    import typing

    from headscope.sae.architectures import REGISTRY, get
    from headscope.sae.model import ARCHITECTURES, THRESHOLDED
    from headscope.sae.options import TRAINABLE, TrainOptions
    assert ARCHITECTURES == tuple(REGISTRY)
    assert set(TRAINABLE) == {n for n, a in REGISTRY.items() if a.trainable}
    assert set(typing.get_args(typing.get_type_hints(TrainOptions)["architecture"])) == set(TRAINABLE)
    assert set(THRESHOLDED) == {n for n, a in REGISTRY.items() if "threshold" in a.param_names}
    for name, arch in REGISTRY.items():
        assert arch.name == name and type(arch).__module__.startswith("headscope.sae.architectures.")
        sae = AttnSAE(SAEConfig(d_in=8, d_sae=16, n_heads=2, d_head=4, layer=0, architecture=name, k=2))
        assert sae.arch is get(name)
        assert set(sae.param_names()) == {n for n, _ in sae.named_parameters()} | \
            ({"threshold"} if name in ("batchtopk", "matryoshka_batchtopk") else set())
    with pytest.raises(HeadscopeError, match="unknown SAE architecture 'nope'"):
        get("nope")
