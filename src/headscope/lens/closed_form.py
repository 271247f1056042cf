"""Closed-form start for lenses: one pass of sufficient statistics instead of many gradient steps.

Per position t the model's centred log-probs y_t = logp_t − mean_v(logp_t) [V]; the **null lens**
c0 = log(mean_t p_t) [V] is the best constant prediction under forward KL (fitted on training tokens).

* ``affine``/``lowrank`` (no norm): we want W_U·x_t ≈ y_t − c0. Its least-squares solution in the
  residual space is x_t = P·(y_t − c0) with P = (W_Uᵀ W_U + εI)⁻¹ W_Uᵀ [d, V], one projection per
  position shared by all heads. x is regressed on the head result r, centred over tokens:
  x ≈ (r − r̄)·M with M = (C_rr + λI)⁻¹ C_rx, C the token covariances. Then A = M − I, b = −r̄·M,
  c = c0 − b_U, so that the lens predicts the null exactly at r = r̄ and a linear deviation around it.
  (For a full-rank M the metric W_UᵀW_U does not change the optimum; for ``lowrank`` A is truncated
  to rank r in that metric: SVD of C_rr^{1/2} A G^{1/2}.)
* ``full``: W = M fitted directly against y (the regressor is N(r) when the lens uses the norm),
  β = c0 − r̄·M.
* ``affine``/``lowrank`` with the norm: the norm makes the map non-linear, so only c = c0 − b_U is set.

Then a **scale calibration**: for each site the deviation is scaled by the s in ``SCALES`` that
minimises forward KL on the calibration tokens (least squares on log-probs over- or under-shoots
the temperature that KL wants).

Statistics are accumulated in float64; under torchrun they are summed over ranks.
"""

from __future__ import annotations

import math

import torch

from ..distributed import Distributed
from ..errors import HeadscopeError
from .lenses import LensBank
from .objectives import forward_kl

SCALES = (0.25, 0.35, 0.5, 0.7, 1.0, 1.4)


class Moments:
    """Running sums for the closed-form fit: n, Σp [V], and per lens Σr [L,d'], Σrrᵀ [L,d',d'],
    Σx [L?,D], Σrxᵀ [L,d',D] (D = d for affine/lowrank, V for full; d' = d)."""

    def __init__(self, bank: LensBank):
        self.bank = bank
        m = bank.model
        d, V = m.d_model, m.d_vocab
        self.full = bank.cfg.kind == "full"
        self.fit_linear = self.full or not bank.cfg.norm
        L = bank.n_lenses
        D = V if self.full else d
        f64 = torch.float64
        self.n = torch.zeros((), dtype=f64)
        self.n_site = torch.zeros(L, dtype=f64)
        self.psum = torch.zeros(V, dtype=f64)
        if self.fit_linear:
            self.rsum = torch.zeros(L, d, dtype=f64)
            self.rr = torch.zeros(L, d, d, dtype=f64)
            self.xsum = torch.zeros(L, D, dtype=f64)
            self.rx = torch.zeros(L, d, D, dtype=f64)
        if not self.full:
            W_U = m.W_U.detach().double().cpu()
            G = W_U.T @ W_U
            G += 1e-6 * G.diagonal().mean() * torch.eye(d, dtype=f64)
            self.G = G
            self.P = torch.linalg.solve(G, W_U.T).float()  # [d, V]

    @torch.no_grad()
    def update(self, R: torch.Tensor, logp: torch.Tensor) -> None:
        """Add a batch: R [K, N, d] site results, logp [N, V]."""
        R, logp = R.float().cpu(), logp.float().cpu()
        self.n += logp.shape[0]
        self.psum += logp.exp().sum(0).double()
        if not self.fit_linear:
            return
        logp = logp.clamp_min(-100.0)  # float32 log-softmax can reach -inf for impossible tokens
        y = logp - logp.mean(-1, keepdim=True)
        if self.full:
            X = y
            if self.bank.cfg.norm:
                R = self.bank.norm(R)
        else:
            X = y @ self.P.T  # [N, d]
        idx = self.bank.lens_index.cpu()
        for k in range(R.shape[0]):
            li = int(idx[k])
            r = R[k].double()
            self.n_site[li] += r.shape[0]
            self.rsum[li] += r.sum(0)
            self.rr[li] += r.T @ r
            self.xsum[li] += X.sum(0).double()
            self.rx[li] += (R[k].T @ X).double()

    def all_reduce(self, dist: Distributed) -> None:
        for name in ("n", "n_site", "psum", "rsum", "rr", "xsum", "rx"):
            if hasattr(self, name):
                dist.all_reduce(getattr(self, name), "sum")

    def null_logits(self) -> torch.Tensor:
        """c0 = log of the mean predicted distribution [V] (float32)."""
        return torch.log((self.psum / self.n).clamp_min(1e-30)).float()

    @torch.no_grad()
    def solve(self, ridge: float = 1e-3) -> None:
        """Set the bank's parameters to the closed-form fit (see module docstring)."""
        bank = self.bank
        c0 = self.null_logits()
        b_U = bank.model.b_U.detach().float().cpu() if bank.model.b_U is not None else torch.zeros_like(c0)
        dev = next(bank.parameters()).device
        if not self.fit_linear:  # affine/lowrank with norm: only the vocabulary bias
            if bank.cfg.vocab_bias:
                bank.c.copy_((c0 - b_U).expand_as(bank.c))
            return
        n = self.n_site.clamp_min(1).view(-1, 1)
        rbar = self.rsum / n
        xbar = self.xsum / n
        C_rr = self.rr / n.unsqueeze(-1) - rbar.unsqueeze(-1) * rbar.unsqueeze(-2)
        C_rx = self.rx / n.unsqueeze(-1) - rbar.unsqueeze(-1) * xbar.unsqueeze(-2)
        d = C_rr.shape[-1]
        lam = ridge * C_rr.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
        if not (torch.isfinite(C_rr).all() and torch.isfinite(C_rx).all()):
            raise HeadscopeError("closed-form lens statistics are not finite (overflow in the head outputs?); use --init base")
        M = _spd_solve(C_rr, C_rx, lam)  # [L, d, D]
        if self.full:
            bank.W.copy_(M.float().to(dev))
            bank.beta.copy_((c0.double() - torch.einsum("ld,ldv->lv", rbar, M)).float().to(dev))
            return
        eye = torch.eye(d, dtype=M.dtype)
        if bank.cfg.kind == "affine":
            bank.A.copy_((M - eye).float().to(dev))
        else:
            A = M - eye
            for li in range(M.shape[0]):
                U, Vt = _low_rank(A[li], C_rr[li] + lam[li] * eye, self.G, bank.cfg.rank)
                bank.U[li].copy_(U.float().to(dev))
                bank.Vt[li].copy_(Vt.float().to(dev))
            M = eye + torch.bmm(bank.U.double().cpu(), bank.Vt.double().cpu())
        bank.b.copy_((-torch.einsum("ld,lde->le", rbar, M)).float().to(dev))
        bank.log_s.zero_()
        if bank.cfg.vocab_bias:
            bank.c.copy_((c0 - b_U).expand_as(bank.c).to(dev))
        else:  # no vocabulary bias: put what the residual space can carry of c0 into b
            bank.b.add_((self.P.double() @ (c0 - b_U).double()).float().to(dev))


def _spd_solve(S: torch.Tensor, B: torch.Tensor, lam: torch.Tensor, rel_cut: float = 1e-7) -> torch.Tensor:
    """Ridge solution X = (S + λI)⁻¹ B for symmetric PSD S [L, d, d], restricted to S's numerical range:
    a head result r_h = z_h·W_O[h] spans only Dh of the d dimensions, and directions with eigenvalue
    below ``rel_cut``·max are float noise that would otherwise be fitted (eigh, one lens at a time)."""
    out = []
    for k in range(S.shape[0]):
        w, Q = torch.linalg.eigh(S[k].contiguous())
        keep = w > rel_cut * w.max().clamp_min(1e-300)
        Qk = Q[:, keep]
        out.append(Qk @ ((Qk.T @ B[k]) / (w[keep] + lam[k]).unsqueeze(-1)))
    return torch.stack(out)


def _sqrt_psd(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w, Q = torch.linalg.eigh(S)
    w = w.clamp_min(w.max() * 1e-10)
    return (Q * w.sqrt()) @ Q.T, (Q / w.sqrt()) @ Q.T


def _low_rank(A: torch.Tensor, C: torch.Tensor, G: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` A ≈ U·Vt minimising tr((A−Â)ᵀ C (A−Â) G): SVD of C^{1/2} A G^{1/2}."""
    Cs, Ci = _sqrt_psd(C)
    Gs, Gi = _sqrt_psd(G)
    U, S, Vh = torch.linalg.svd(Cs @ A @ Gs)
    k = min(rank, S.numel())
    Uk = Ci @ U[:, :k] * S[:k].sqrt()
    Vk = (S[:k].sqrt().unsqueeze(-1) * Vh[:k]) @ Gi
    if k < rank:  # pad with zeros to the configured rank
        Uk = torch.cat([Uk, torch.zeros(A.shape[0], rank - k, dtype=A.dtype)], 1)
        Vk = torch.cat([Vk, torch.zeros(rank - k, A.shape[1], dtype=A.dtype)], 0)
    return Uk, Vk


@torch.no_grad()
def calibrate_scale(bank: LensBank, batches: list[tuple[torch.Tensor, torch.Tensor]], c0: torch.Tensor,
                    scales=SCALES, dist: Distributed | None = None) -> torch.Tensor:
    """Scale each site's deviation from the null by the best s in ``scales`` (forward KL on the
    given (R [K,N,d], logp [N,V]) batches). Shared lenses pick the s best summed over their heads.
    Returns the chosen s per lens [L]."""
    K = len(bank.sites)
    kl = torch.zeros(len(scales), K, dtype=torch.float64)
    c0 = c0.to(next(bank.parameters()).device)
    for R, logp in batches:
        logits = bank(R)
        dev = logits - c0
        for i, s in enumerate(scales):
            kl[i] += forward_kl(c0 + s * dev, logp).double().cpu() * logp.shape[0]
    if dist is not None:
        dist.all_reduce(kl, "sum")
    L = bank.n_lenses
    per_lens = torch.zeros(len(scales), L, dtype=torch.float64).index_add_(1, bank.lens_index.cpu(), kl)
    best = torch.tensor([scales[i] for i in per_lens.argmin(0).tolist()])
    dev_ = next(bank.parameters()).device
    if bank.cfg.kind == "full":
        bank.W.mul_(best.view(-1, 1, 1).to(dev_))
        bank.beta.copy_(c0 + best.view(-1, 1).to(dev_) * (bank.beta - c0))
    else:
        bank.log_s.add_(torch.log(best).to(dev_))
        if bank.cfg.vocab_bias:
            pass  # c is not scaled: logits = W_U·(s·x) + b_U + c
    return best


def kl_bits(nats: float) -> float:
    return nats / math.log(2)
