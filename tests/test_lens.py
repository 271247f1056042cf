"""Lens bank, closed-form start, trainer (resume), evaluation: tiny random models of each family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from headscope.errors import HeadscopeError
from headscope.lens.closed_form import Moments
from headscope.lens.collect import site_batch
from headscope.lens.evaluate import evaluate_bank, run_eval
from headscope.lens.lenses import LensBank, LensConfig, load_bank, save_bank
from headscope.lens.objectives import forward_kl
from headscope.lens.options import EvalOptions, LensTrainConfig, TrainOptions
from headscope.lens.train import load_null, run_train
from headscope.runs import RunDir
from headscope.sites import parse_sites
from headscope.testing.tiny import FAMILIES, tiny_model

SMALL = dict(tokens=1024, init_tokens=512, batch_size=2, seq_len=32, chunk_tokens=24, checkpoint_every=2)


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in FAMILIES}


def _ids(seed=0, B=2, S=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 512, (B, S), generator=g)


def _np_result(model, ids, layer, head):
    """r_h from z and W_O with numpy: z_h [N, Dh] @ W_O[h] [Dh, d]."""
    from headscope.capture import capture
    z = capture(model, ids, layers=[layer], what=("z",))["z"][layer][:, :, head]
    return z.reshape(-1, z.shape[-1]).numpy().astype(np.float64) @ model.W_O(layer)[head].detach().numpy().astype(np.float64)


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_and_step0_equals_unembedding(models, family):
    m = models[family]
    sites = [(0, 1), (2, 3), (2, 0)]
    ids = _ids()
    R, lp = site_batch(m, ids, sites)
    assert R.shape == (3, ids.numel(), m.d_model) and lp.shape == (ids.numel(), m.d_vocab)
    np.testing.assert_allclose(R[1].numpy(), _np_result(m, ids, 2, 3), rtol=1e-4, atol=1e-5)
    W_U = m.W_U.detach().numpy().astype(np.float64)
    b_U = m.b_U.detach().numpy() if m.b_U is not None else 0.0
    # affine, no norm, identity start: exactly W_U·r + b_U
    bank = LensBank(m, sites, LensConfig(kind="affine", norm=False))
    np.testing.assert_allclose(bank(R).detach().numpy(), R.double().numpy() @ W_U.T + b_U, rtol=1e-4, atol=1e-4)
    # with the norm: W_U·N(r) + b_U
    bank = LensBank(m, sites, LensConfig(kind="affine", norm=True))
    ref = m.final_norm(R).detach().double().numpy() @ W_U.T + b_U
    np.testing.assert_allclose(bank(R).detach().numpy(), ref, rtol=1e-4, atol=1e-4)
    for kind in ("lowrank", "full"):
        b = LensBank(m, sites, LensConfig(kind=kind, rank=4))
        assert b(R).shape == (3, ids.numel(), m.d_vocab)
        np.testing.assert_allclose(b(R).detach().numpy(), R.double().numpy() @ W_U.T + b_U, rtol=1e-4, atol=1e-4)
    shared = LensBank(m, sites, LensConfig(shared=True))
    assert shared.n_lenses == 2 and shared.lens_index.tolist() == [0, 1, 1]
    assert shared(R).shape == (3, ids.numel(), m.d_vocab)


def test_closed_form_matches_numpy_lstsq(models):
    m = models["llama_gqa"]
    sites = [(1, 0), (2, 2)]
    bank = LensBank(m, sites, LensConfig(kind="affine"))
    mo = Moments(bank, z=False)   # fed head results (the z-space sums are checked against these below)
    Rs, lps = [], []
    for s in range(3):
        R, lp = site_batch(m, _ids(s, 4, 16), sites)
        mo.update(R, lp)
        Rs.append(R), lps.append(lp)
    mo.solve(ridge=1e-7)  # r_h spans only Dh of d dims: C_rr is singular, the ridge picks the min-norm fit
    R = torch.cat(Rs, 1).double().numpy()
    lp = torch.cat(lps).double().numpy()
    p = np.exp(lp)
    c0 = np.log(p.mean(0))
    np.testing.assert_allclose(mo.null_logits().numpy(), c0, rtol=1e-4, atol=1e-4)
    W_U = m.W_U.detach().double().numpy()
    y = lp - lp.mean(1, keepdims=True)
    X = np.linalg.lstsq(W_U, (y - c0).T, rcond=None)[0].T  # [N, d]: least squares in residual space
    for k in range(2):
        r = R[k]
        rc, Xc = r - r.mean(0), X - X.mean(0)
        M = np.linalg.lstsq(rc, Xc, rcond=1e-5)[0]  # r_h has rank Dh < d: drop float32 noise directions
        pred = r @ (np.eye(m.d_model) + bank.A[k].detach().double().numpy()) + bank.b[k].detach().double().numpy()
        np.testing.assert_allclose(pred, (r - r.mean(0)) @ M, rtol=2e-3, atol=2e-3)
    # at r = r̄ the lens predicts the null exactly
    rbar = torch.tensor(R[0].mean(0), dtype=torch.float32).view(1, 1, -1).repeat(2, 1, 1)
    out = bank(rbar)[0, 0].detach().numpy()
    np.testing.assert_allclose(out - out.mean(), c0 - c0.mean(), atol=2e-3)


@pytest.mark.parametrize("family,kind,shared", [("llama_gqa", "affine", "none"), ("gpt2", "lowrank", "none"),
                                                ("gpt2", "affine", "layer"), ("gemma2", "affine", "none")])
def test_z_space_fit_and_logits_equal_result_space(models, family, kind, shared):
    """A lens that reads z (sums of z·zᵀ, the solve in the span of W_O, logits through z·Bz) gives the
    same parameters, the same calibrated scale and the same logits as the same lens fitted and applied
    on the head results r = z·W_O — including shared lenses and a control site."""
    from headscope.lens.closed_form import calibrate_scale
    from headscope.lens.sampling import select_positions
    from headscope.lens.train import control_sites
    m = models[family]
    sites = [(1, 0), (1, 1), (2, 1)]
    banks, fed = {}, {}
    for space in ("result", "z"):
        bank = LensBank(m, sites, LensConfig(kind=kind, rank=3, shared=shared), controls=control_sites(sites))
        mo = Moments(bank, z=space == "z")
        assert mo.z == (space == "z")
        calib = None
        for s in range(3):
            ids = _ids(s, 4, 16)
            X, lp = site_batch(m, ids, bank.all_sites, space=space)
            X, lp, _ = select_positions(X, lp, ids, len(bank.control_sites), torch.Generator().manual_seed(s))
            mo.update(X, lp)
            calib = calib or (X, lp)
        mo.solve()
        scale = calibrate_scale(bank, *calib, mo.null_logits(), z=space == "z")
        banks[space], fed[space] = (bank, scale), calib
    (br, sr), (bz, sz) = banks["result"], banks["z"]
    torch.testing.assert_close(sz, sr, rtol=1e-3, atol=1e-4)
    # the scale fit from z takes z·Bz with many positions and r = z·W_O with few: both equal the r-space fit
    assert fed["z"][0].shape[1] * (m.d_model - m.d_head) > m.d_head * m.d_model
    few = {sp: (fed[sp][0][:, :3], fed[sp][1][:3]) for sp in fed}
    saved = {sp: banks[sp][0].log_s.clone() for sp in few}   # calibrate_scale updates log_s in place
    s_few = {sp: calibrate_scale(banks[sp][0], *few[sp], torch.zeros(m.d_vocab), steps=1, z=sp == "z") for sp in few}
    torch.testing.assert_close(s_few["z"], s_few["result"], rtol=5e-3, atol=1e-4)
    with torch.no_grad():
        for sp in few:
            banks[sp][0].log_s.copy_(saved[sp])
    for name, v in br.state_dict().items():
        if name not in ("U", "Vt"):   # a low-rank factorisation is unique only up to signs: compare U·Vt
            torch.testing.assert_close(bz.state_dict()[name], v, rtol=2e-3, atol=1e-3 * float(v.abs().max()), msg=name)
    if kind == "lowrank":
        A = br.U @ br.Vt
        torch.testing.assert_close(bz.U @ bz.Vt, A, rtol=2e-3, atol=1e-3 * float(A.abs().max()))
    Z, R = fed["z"][0], fed["result"][0]
    rows = list(range(len(bz.all_sites)))
    W_O = torch.stack([m.W_O(l)[h] for l, h in bz.all_sites]).float()
    torch.testing.assert_close(torch.bmm(Z, W_O), R, rtol=1e-4, atol=1e-5)   # the same positions and donors
    with torch.no_grad():
        torch.testing.assert_close(bz.logits_from_z(Z, bz.z_maps(rows), rows), bz(R), rtol=1e-4, atol=1e-4)


def test_lowrank_closed_form_is_low_rank(models):
    m = models["gpt2"]
    bank = LensBank(m, [(1, 0)], LensConfig(kind="lowrank", rank=3))
    mo = Moments(bank, z=False)
    for s in range(2):
        mo.update(*site_batch(m, _ids(s, 4, 16), bank.sites))
    mo.solve()
    A = (bank.U[0] @ bank.Vt[0]).detach()
    assert torch.linalg.matrix_rank(A.double(), rtol=1e-6) <= 3 and A.abs().max() > 0


def test_train_loss_decreases_and_eval(tmp_path, models):
    m = models["gpt2"]
    run = RunDir(tmp_path / "run", m.identity())
    sites = [(1, 0), (2, 1)]
    s = run_train(m, run, sites, LensConfig(norm=True), LensTrainConfig(init="identity", lr=3e-2, **SMALL),
                  progress=False)
    h = [x["loss_bits"] for x in s["history"]]
    assert len(h) == 16 and np.mean(h[-4:]) < 0.7 * np.mean(h[:2])
    assert (tmp_path / "run/lens/lenses.safetensors").exists() and not (tmp_path / "run/lens/checkpoint").exists()
    out = run_eval(m, run, EvalOptions(tokens=256, batch_size=2, transfer_tokens=64), progress=False)
    ph = out["per_head"]["2.1"]
    assert ph["gain"] == pytest.approx(ph["kl_null"] - ph["kl_lens"])
    assert out["heatmap_gain"][2][1] == ph["gain"] and out["heatmap_gain"][0][0] is None
    assert np.array(out["transfer"]["kl"]).shape == (2, 2)
    assert all((tmp_path / "run/lens" / f).stat().st_size > 0 for f in ("eval_gain.png", "eval_improvement.png", "transfer.png"))
    assert out["transfer"]["kl"][1][1] == pytest.approx(ph["kl_lens"], rel=0.2)
    # the lenses applied to another checkpoint of the same architecture
    from headscope.lens.evaluate import run_checkpoint_transfer
    t = run_checkpoint_transfer(tiny_model("gpt2", seed=1), run, EvalOptions(tokens=128, batch_size=2), progress=False)
    assert set(t["per_head"]) == {"1.0", "2.1"} and (tmp_path / "run/lens/transfer_checkpoint.json").exists()
    assert t["source_model"]["unembed_sha1"] != t["target_model"]["unembed_sha1"]
    with pytest.raises(HeadscopeError, match="transfer-tokens"):
        run_checkpoint_transfer(tiny_model("gpt2", seed=1), run, EvalOptions(transfer_tokens=64), progress=False)
    # independent recomputation of the metrics on one batch with numpy
    bank, _ = load_bank(m, run / "lens")
    null = load_null(run / "lens")
    ids = _ids(7, 2, 16)
    res = evaluate_bank(m, bank, null, [ids], progress=False)
    R, lp = site_batch(m, ids, bank.sites)
    keep = (torch.arange(ids.numel()) % ids.shape[1]) != 0  # position 0 (BOS) is left out
    R, lp = R[:, keep], lp[keep]
    p = lp.double().exp().numpy()
    lq = torch.log_softmax(bank(R).detach().double(), -1).numpy()
    kl = (p * (lp.double().numpy() - lq)).sum(-1).mean(-1) / np.log(2)
    ln = np.log(np.exp(null.double().numpy()) / np.exp(null.double().numpy()).sum())
    kl_null = (p * (lp.double().numpy() - ln)).sum(-1).mean() / np.log(2)
    W_U = m.W_U.detach().double().numpy()
    lb = m.final_norm(R).detach().double().numpy() @ W_U.T + (m.b_U.detach().double().numpy() if m.b_U is not None else 0)
    lb = lb - np.log(np.exp(lb).sum(-1, keepdims=True))
    kl_u = (p * (lp.double().numpy() - lb)).sum(-1).mean(-1) / np.log(2)
    for i, name in enumerate(["1.0", "2.1"]):
        assert res["per_head"][name]["kl_lens"] == pytest.approx(kl[i], rel=1e-4, abs=1e-6)
        assert res["per_head"][name]["kl_unembed"] == pytest.approx(kl_u[i], rel=1e-4, abs=1e-6)
        assert res["per_head"][name]["kl_null"] == pytest.approx(kl_null, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kind,opt,objective", [("affine", "adam", "fkl"), ("lowrank", "sgd", "rkl"),
                                                ("full", "adam", "ce"), ("affine", "adam", "fkl_shortlist")])
def test_resume_equals_uninterrupted(tmp_path, models, kind, opt, objective):
    m = models["llama_gqa"]
    sites = [(0, 0), (2, 3)]
    lens = LensConfig(kind=kind, rank=4)
    cfg = LensTrainConfig(optimizer=opt, objective=objective, lr=1e-2, shortlist_negatives=64,
                      **{**SMALL, "tokens": 384, "init_tokens": 128})
    ra = RunDir(tmp_path / "a", m.identity())
    run_train(m, ra, sites, lens, cfg, progress=False)
    rb = RunDir(tmp_path / "b", m.identity())
    stopped = run_train(m, rb, sites, lens, cfg, progress=False, stop_at_step=3)
    assert stopped == {"stopped_at": 3} and (tmp_path / "b/lens/checkpoint/state.safetensors").exists()
    torch.manual_seed(123)  # a resumed process starts with another RNG state; the checkpoint restores it
    s = run_train(m, rb, sites, lens, cfg, progress=False)
    assert s["resumed"]
    a, _ = load_bank(m, tmp_path / "a/lens")
    b, _ = load_bank(m, tmp_path / "b/lens")
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), n


def test_shared_lens_trains(tmp_path, models):
    m = models["neox_parallel"]
    run = RunDir(tmp_path / "r", m.identity())
    s = run_train(m, run, [(1, 0), (1, 2), (2, 1)], LensConfig(shared=True),
                  LensTrainConfig(**{**SMALL, "tokens": 256}), progress=False)
    bank, info = load_bank(m, run / "lens")
    assert bank.n_real_lenses == 2 and bank.n_lenses == 3 and info["lens"]["shared"] == "layer" and s["steps"] == 4
    assert info["controls"] == [[1, 2]] and bank.lens_index.tolist() == [0, 0, 1, 2]
    # one lens for every head of every layer (the cross-layer question), plus the control lens
    run2 = RunDir(tmp_path / "r2", m.identity())
    run_train(m, run2, [(1, 0), (1, 2), (2, 1)], LensConfig(shared="all"),
              LensTrainConfig(**{**SMALL, "tokens": 256}), progress=False)
    bank2, _ = load_bank(m, run2 / "lens")
    assert bank2.n_lenses == 2 and bank2.lens_index.tolist() == [0, 0, 0, 1]
    with pytest.raises(HeadscopeError, match="unknown sharing"):
        LensConfig(shared="heads")


def test_bad_input(tmp_path, models):
    m, other = models["gpt2"], models["llama_gqa"]
    with pytest.raises(HeadscopeError, match="out of range"):
        parse_sites("1.7", m)
    with pytest.raises(HeadscopeError, match="out of range"):
        parse_sites("9.*", m)
    with pytest.raises(HeadscopeError, match="cannot parse"):
        parse_sites("1.x", m)
    bank = LensBank(m, [(1, 1)], LensConfig())
    save_bank(bank, tmp_path / "l")
    with pytest.raises(HeadscopeError, match="made for model 'tiny-gpt2'"):
        load_bank(other, tmp_path / "l")
    same_arch = tiny_model("gpt2", seed=1)
    with pytest.raises(HeadscopeError, match="unembed_sha1"):
        load_bank(same_arch, tmp_path / "l")
    load_bank(same_arch, tmp_path / "l", allow_other_checkpoint=True)
    info = json.loads((tmp_path / "l/lenses.json").read_text())
    info["format"] = 0
    (tmp_path / "l/lenses.json").write_text(json.dumps(info))
    with pytest.raises(HeadscopeError, match="format 0"):
        load_bank(m, tmp_path / "l")
    (tmp_path / "l/lenses.json").write_text("{not json")
    with pytest.raises(HeadscopeError, match="corrupt JSON"):
        load_bank(m, tmp_path / "l")
    # a corrupt checkpoint: one-line error, nothing written
    run = RunDir(tmp_path / "r", m.identity())
    run_train(m, run, [(1, 1)], LensConfig(), LensTrainConfig(**SMALL), progress=False, stop_at_step=2)
    (tmp_path / "r/lens/checkpoint/state.safetensors").write_bytes(b"garbage")
    with pytest.raises(HeadscopeError, match="corrupt"):
        run_train(m, run, [(1, 1)], LensConfig(), LensTrainConfig(**SMALL), progress=False)
    assert not (tmp_path / "r/lens/lenses.json").exists()
    run_train(m, run, [(1, 1)], LensConfig(), LensTrainConfig(**SMALL), progress=False, stop_at_step=2, fresh=True)
    with pytest.raises(HeadscopeError, match="other training options"):
        run_train(m, run, [(1, 1)], LensConfig(), LensTrainConfig(**{**SMALL, "lr": 0.5}), progress=False)
    with pytest.raises(HeadscopeError, match="unknown lens kind"):
        LensConfig(kind="nope")
    with pytest.raises(HeadscopeError, match="objective"):
        LensTrainConfig(objective="mse")
    with pytest.raises(HeadscopeError, match="seq-len must be at least 2"):
        TrainOptions(seq_len=1)        # the stage's options run both parents' checks
    with pytest.raises(HeadscopeError, match="lens rank"):
        TrainOptions(kind="lowrank", rank=0)
    # the trainer's configurations are values: frozen, hashable, equal when their fields are
    import dataclasses
    with pytest.raises(dataclasses.FrozenInstanceError):
        LensTrainConfig().lr = 1.0
    assert LensConfig(shared=True) == LensConfig(shared="layer") and hash(LensTrainConfig()) == hash(LensTrainConfig())
    assert TrainOptions(shared="all", lr=0.5).configs() == (LensConfig(shared="all"), LensTrainConfig(lr=0.5))


def test_forward_kl_matches_numpy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    lp = torch.log_softmax(torch.randn(5, 7, generator=g), -1)
    p = lp.exp().numpy()
    lq = torch.log_softmax(logits, -1).numpy()
    ref = (p * (lp.numpy() - lq)).sum(-1).mean(-1)
    np.testing.assert_allclose(forward_kl(logits, lp).numpy(), ref, rtol=1e-5)


def test_softcap_baseline_and_lens_match_the_models_logits():
    """Gemma-2 soft-caps its final logits: the unembedding baseline and an identity lens read through
    the norm apply the same cap, so on the final residual they reproduce the model's own logits."""
    from headscope.capture import capture
    from headscope.lens.evaluate import baseline_logits
    m = tiny_model("gemma2")
    m.hf.config.final_logit_softcapping = 0.5  # small enough that the cap changes every logit
    last = m.n_layers - 1
    c = capture(m, _ids(3), layers=[last], what=("resid_post", "logits"))
    x = c["resid_post"][last].reshape(1, -1, m.d_model)
    want = c.logits.reshape(-1, m.d_vocab)
    assert want.abs().max() < 0.5 and (x.norm() > 0)
    torch.testing.assert_close(baseline_logits(m, x)[0], want, rtol=1e-4, atol=1e-5)
    bank = LensBank(m, [(last, 0)], LensConfig(norm=True))
    torch.testing.assert_close(bank(x)[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,kind,cap", [("gpt2", "affine", None), ("llama_gqa", "full", None),
                                             ("gemma2", "affine", 2.0)])
def test_scale_calibration_minimises_kl(models, family, kind, cap):
    """The Newton-fitted scale is the minimum of forward KL over s (checked against a dense grid of
    directly computed KLs), for linear logits and under soft-capping."""
    from headscope.lens.closed_form import calibrate_scale
    m = tiny_model(family) if cap else models[family]
    if cap:
        m.hf.config.final_logit_softcapping = cap
    sites = [(1, 0), (2, 1)]
    bank = LensBank(m, sites, LensConfig(kind=kind))
    mo = Moments(bank, z=False)
    R, lp = site_batch(m, _ids(0, 4, 32), sites)
    mo.update(R, lp)
    mo.solve()
    c0 = mo.null_logits()
    with torch.no_grad():  # push the lenses away from their optimum so that s has work to do
        if kind == "full":
            bank.W.mul_(3.0), bank.beta.copy_(c0 + 3.0 * (bank.beta - c0))
        else:
            bank.log_s.fill_(float(np.log(3.0)))
    before = {k: v.clone() for k, v in bank.state_dict().items()}

    def kl_at(scale):  # forward KL of the lenses with the scale applied from ``before``
        bank.load_state_dict(before)
        with torch.no_grad():
            if kind == "full":
                bank.W.mul_(scale.view(-1, 1, 1)), bank.beta.copy_(c0 + scale.view(-1, 1) * (bank.beta - c0))
            else:
                bank.log_s.add_(torch.log(scale))
            return forward_kl(bank(R), lp).double()

    grid = torch.linspace(0.02, 1.5, 149)
    kls = torch.stack([kl_at(torch.full((2,), float(s))) for s in grid])  # [G, K]
    bank.load_state_dict(before)
    s = calibrate_scale(bank, R, lp, c0, steps=8)
    found = forward_kl(bank(R), lp).double()
    assert (found <= kls.min(0).values * (1 + 1e-4) + 1e-9).all(), (s, grid[kls.argmin(0)])
    assert (found < 0.9 * kls[grid.sub(1.0).abs().argmin()]).all()  # clearly better than leaving s = 1


def test_eval_stride_and_no_baselines(models):
    """``stride`` evaluates every stride-th kept position of each window (same windows, same documents);
    ``baselines=False`` leaves the unembedding baselines out and changes nothing else."""
    m = models["gpt2"]
    sites = [(1, 0), (2, 1)]
    bank = LensBank(m, sites, LensConfig())
    mo = Moments(bank)
    for s in range(2):
        mo.update(*site_batch(m, _ids(s, 4, 16), bank.sites, space="z"))
    mo.solve()
    null = mo.null_logits()
    ids = _ids(9, 3, 16)
    full = evaluate_bank(m, bank, null, [ids], progress=False)
    half = evaluate_bank(m, bank, null, [ids], progress=False, stride=2, baselines=False)
    assert half["tokens"] == 3 * 8 and full["tokens"] == 3 * 15 and half["windows"] == full["windows"] == 3
    R, lp = site_batch(m, ids, bank.sites)
    keep = torch.arange(ids.numel()) % 16 != 0
    R, lp = R[:, keep], lp[keep]
    sub = torch.arange(R.shape[1]).view(3, 15)[:, ::2].reshape(-1)
    R, lp = R[:, sub], lp[sub]
    with torch.no_grad():
        lq = torch.log_softmax(bank(R).double(), -1)
    kl = (lp.double().exp() * (lp.double() - lq)).sum(-1).mean(-1) / np.log(2)
    for i, name in enumerate(["1.0", "2.1"]):
        assert half["per_head"][name]["kl_lens"] == pytest.approx(float(kl[i]), rel=1e-4, abs=1e-6)
        assert half["per_head"][name]["kl_unembed"] is None and half["per_head"][name]["improvement"] is None
        assert full["per_head"][name]["kl_unembed"] is not None
