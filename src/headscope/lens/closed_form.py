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

Then a **scale calibration**: each lens' deviation from the null is scaled by the s that minimises
forward KL on ``CALIB_TOKENS`` calibration positions (least squares on log-probs over- or under-shoots
the temperature that KL wants); KL is convex in s, so a few Newton steps find it (``calibrate_scale``).

Statistics are accumulated in float64; under torchrun they are summed over ranks.
"""

from __future__ import annotations

import math
import sys

import torch

from ..distributed import Distributed
from ..errors import HeadscopeError
from .lenses import LensBank, softcap
from .options import CALIB_TOKENS


class Moments:
    """Running sums for the closed-form fit: n, Σp [V], and per lens Σr [L,d'], Σrrᵀ [L,d',d'],
    Σx [L?,D], Σrxᵀ [L,d',D] (D = d for affine/lowrank, V for full; d' = d).

    For a bank that reads z (:meth:`LensBank.reads_z`: affine/lowrank without the norm) the sums are
    kept per site in z-space instead — Σz [K, Dh], Σzzᵀ [K, Dh, Dh], Σzxᵀ [K, Dh, d] — and ``update``
    takes z [K, N, Dh]: r = z·W_O, so Σrrᵀ = W_Oᵀ·Σzzᵀ·W_O (and so on) exactly, at (Dh/d)² of the
    cost, and a lens of one head is solved in the Dh-dimensional span of W_O[h] (:func:`_solve_in_span`)."""

    def __init__(self, bank: LensBank, z: bool | None = None):
        self.bank = bank
        m = bank.model
        d, V = m.d_model, m.d_vocab
        self.full = bank.cfg.kind == "full"
        self.fit_linear = self.full or not bank.cfg.norm
        self.z = bank.reads_z() if z is None else (z and bank.reads_z())
        L = bank.n_lenses
        D = V if self.full else d
        f64 = torch.float64
        self.n = torch.zeros((), dtype=f64)
        self.psum = torch.zeros(V, dtype=f64)
        if self.z:
            K, Dh = len(bank.all_sites), m.d_head
            self.n_site = torch.zeros(K, dtype=f64)
            self.rsum = torch.zeros(K, Dh, dtype=f64)     # Σz per site
            self.rr = torch.zeros(K, Dh, Dh, dtype=f64)   # Σzzᵀ
            self.xsum = torch.zeros(K, D, dtype=f64)
            self.rx = torch.zeros(K, Dh, D, dtype=f64)    # Σzxᵀ
        elif self.fit_linear:
            self.n_site = torch.zeros(L, dtype=f64)
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
        """Add a batch: R [K, N, d] site results (z [K, N, Dh] for a bank that reads z), logp [N, V]."""
        if self.full and self.bank.cfg.norm:  # the regressor is N(r), computed where the model lives
            R = self.bank.norm(R.to(self.bank.model.device))
        R, logp = R.float().cpu(), logp.float().cpu()
        self.n += logp.shape[0]
        self.psum += logp.exp().sum(0).double()
        if not self.fit_linear:
            return
        logp = logp.clamp_min(-100.0)  # float32 log-softmax can reach -inf for impossible tokens
        y = logp - logp.mean(-1, keepdim=True)
        if self.full:
            X = y
        else:
            X = y @ self.P.T  # [N, d]
        Xs = X.sum(0).double()
        idx = range(R.shape[0]) if self.z else self.bank.lens_index.cpu().tolist()
        for k, li in enumerate(idx):
            r = R[k].double()
            self.n_site[li] += r.shape[0]
            self.rsum[li] += r.sum(0)
            self.rr[li] += r.T @ r
            self.xsum[li] += Xs
            self.rx[li] += (R[k].T @ X).double()

    def all_reduce(self, dist: Distributed) -> None:
        for name in ("n", "n_site", "psum", "rsum", "rr", "xsum", "rx"):
            if hasattr(self, name):
                dist.all_reduce(getattr(self, name), "sum")

    def null_logits(self) -> torch.Tensor:
        """c0 = log of the mean predicted distribution [V] (float32)."""
        return torch.log((self.psum / self.n).clamp_min(1e-30)).float()

    def _lens_sums(self) -> tuple[torch.Tensor, ...]:
        """(n [L], Σr [L, d], Σrrᵀ [L, d, d], Σx [L, D], Σrxᵀ [L, d, D]) in r-space, per lens."""
        if not self.z:
            return self.n_site, self.rsum, self.rr, self.xsum, self.rx
        bank, m = self.bank, self.bank.model
        L, d = bank.n_lenses, m.d_model
        D = self.xsum.shape[1]
        f64 = torch.float64
        n, rsum, rr = torch.zeros(L, dtype=f64), torch.zeros(L, d, dtype=f64), torch.zeros(L, d, d, dtype=f64)
        xsum, rx = torch.zeros(L, D, dtype=f64), torch.zeros(L, d, D, dtype=f64)
        for k, li in enumerate(bank.lens_index.cpu().tolist()):
            W = self._W_O(k)
            n[li] += self.n_site[k]
            rsum[li] += self.rsum[k] @ W
            rr[li] += W.T @ self.rr[k] @ W
            xsum[li] += self.xsum[k]
            rx[li] += W.T @ self.rx[k]
        return n, rsum, rr, xsum, rx

    def _W_O(self, k: int) -> torch.Tensor:
        l, h = self.bank.all_sites[k]
        return self.bank.model.W_O(l)[h].detach().double().cpu()   # [Dh, d]

    @torch.no_grad()
    def solve(self, ridge: float = 1e-3) -> None:
        """Set the bank's parameters to the closed-form fit (see module docstring)."""
        bank = self.bank
        c0 = self.null_logits()
        b_U = bank.model.b_U.detach().float().cpu() if bank.model.b_U is not None else torch.zeros_like(c0)
        b_U = softcap(b_U, bank.model.logit_softcap)  # the lens adds c after the cap: φ(b_U) + c = c0 at x = 0
        dev = next(bank.parameters()).device
        if not self.fit_linear:  # affine/lowrank with norm: only the vocabulary bias
            if bank.cfg.vocab_bias:
                bank.c.copy_((c0 - b_U).expand_as(bank.c))
            return
        own = bank.lens_index.cpu().tolist()
        single = {li: k for k, li in enumerate(own) if own.count(li) == 1} if self.z else {}
        if self.z and len(single) == bank.n_lenses:   # one head per lens: solve in the span of W_O[h]
            fits = [_solve_in_span(self, single[li], ridge) for li in range(bank.n_lenses)]
            M, rbar, C_rr, lam = (torch.stack([f[i] for f in fits]) for i in range(4))
        else:
            n_l, rsum, rr, xsum, rx = self._lens_sums()
            n = n_l.clamp_min(1).view(-1, 1)
            rbar = rsum / n
            xbar = xsum / n
            C_rr = rr / n.unsqueeze(-1) - rbar.unsqueeze(-1) * rbar.unsqueeze(-2)
            C_rx = rx / n.unsqueeze(-1) - rbar.unsqueeze(-1) * xbar.unsqueeze(-2)
            lam = ridge * C_rr.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
            if not (torch.isfinite(C_rr).all() and torch.isfinite(C_rx).all()):
                raise HeadscopeError("closed-form lens statistics are not finite (overflow in the head outputs?); use --init base")
            M = _spd_solve(C_rr, C_rx, lam)  # [L, d, D]
        d = M.shape[1]
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


def _solve_in_span(mo: Moments, k: int, ridge: float, rel_cut: float = 1e-7):
    """The ridge fit of :func:`_spd_solve` for site ``k`` from its z-space sums, without forming the
    d×d problem: with W_Oᵀ = Q·T (QR; Q [d, Dh] orthonormal), r = u·Qᵀ for u = z·Tᵀ, so C_rr = Q·C_uu·Qᵀ
    has the eigenvectors Q·U of C_uu's and zeros elsewhere (which the cut drops), and
    M = Q·U·diag(1/(w + λ))·Uᵀ·T·C_zx. λ = ridge · mean diag(C_rr) = ridge · tr(C_uu)/d, as there.
    Returns (M [d, d], r̄ [d], C_rr [d, d], λ)."""
    n = mo.n_site[k].clamp_min(1)
    zbar, xbar = mo.rsum[k] / n, mo.xsum[k] / n
    C_zz = mo.rr[k] / n - torch.outer(zbar, zbar)
    C_zx = mo.rx[k] / n - torch.outer(zbar, xbar)
    if not (torch.isfinite(C_zz).all() and torch.isfinite(C_zx).all()):
        raise HeadscopeError("closed-form lens statistics are not finite (overflow in the head outputs?); use --init base")
    W = mo._W_O(k)
    d = W.shape[1]
    Q, T = torch.linalg.qr(W.T)                       # [d, Dh], [Dh, Dh]
    C_uu = T @ C_zz @ T.T
    lam = ridge * (C_uu.diagonal().sum() / d).clamp_min(1e-12)
    w, U = torch.linalg.eigh(C_uu)
    keep = w > rel_cut * w.max().clamp_min(1e-300)
    QU = Q @ U[:, keep]
    M = QU @ ((U[:, keep].T @ (T @ C_zx)) / (w[keep] + lam).unsqueeze(-1))
    return M, zbar @ W, Q @ C_uu @ Q.T, lam


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


NEWTON_STEPS = 4
S_MIN, S_MAX = 1e-2, 20.0
SITES_PER_CHUNK = 8
"""Sites whose [n, V] logits are held at once during calibration (memory: chunk·n·V floats)."""


def _scale_pieces(bank: LensBank, r: torch.Tensor, lenses: torch.Tensor, c0: torch.Tensor, rows=None, z=False):
    """Logits of the given sites as a(s) = a0 + φ(b + s·g): returns (a0 [k,1|n,V], b, g [k,n,V]).
    affine/lowrank: g = W_U·x at s = 1 (x before the norm), b = b_U, a0 = c; full: a(s) = c0 + s·(a(1) − c0).
    ``z``: r holds the sites' z [k, n, Dh] and ``rows`` their indices in ``bank.all_sites``."""
    if bank.cfg.kind == "full":
        return c0.view(1, 1, -1), None, bank(r, lenses=lenses) - c0
    W_U, b_U = bank.unembed()
    if z and r.shape[1] * (bank.model.d_model - r.shape[2]) > r.shape[2] * bank.model.d_model:
        Bz, e = bank.z_maps(rows)      # k·Dh·(d + n)·V multiply-adds: cheaper than k·n·d·V for n > Dh·d/(d − Dh)
        g = torch.baddbmm(e.unsqueeze(1), r.float(), Bz)
    else:
        if z:                           # few positions: r = z·W_O[h] first, then one k·n·d·V product
            r = torch.bmm(r.float(), bank.site_W_O(rows).to(r.device))
        g = bank.transform(r, lenses) @ W_U.T
    a0 = bank._p("c", lenses)[:, None, :] if bank.cfg.vocab_bias else torch.zeros(1, 1, 1, device=g.device)
    return a0, b_U, g


def _newton_terms(s: torch.Tensor, a0, b, g: torch.Tensor, p: torch.Tensor, cap: float | None,
                  pg: torch.Tensor | None = None):
    """For a(s) = a0 + φ(b + s·g) per site (s [k]): the first and second derivatives in s of
    Σ_n KL(p_n ‖ softmax a_n), each [k] (float64). φ is the identity or C·tanh(·/C). ``pg`` [k, n]:
    E_p[g], which does not depend on s (linear case; computed here when not given)."""
    if not cap:                                       # (before forming b + s·g: the linear case never needs it)
        return _newton_terms_linear(s, a0 if b is None else a0 + b, g, p, pg)
    z = g * s.view(-1, 1, 1)
    if b is not None:
        z = z + b
    tau = torch.tanh(z / cap)
    a = a0 + cap * tau
    d1 = g * (1 - tau * tau)                          # da/ds
    d2 = g * g * (-2.0 / cap) * tau * (1 - tau * tau)  # d²a/ds²
    lse = torch.logsumexp(a, -1)                      # [k, n]
    q = a.sub_(lse.unsqueeze(-1)).exp_()             # softmax, in place of a
    qd1 = q * d1
    m1 = qd1.sum(-1)                                  # E_q[a']
    m2 = torch.einsum("knv,knv->kn", qd1, d1)         # E_q[a'²]
    pd1 = torch.einsum("nv,knv->kn", p, d1)
    f1 = (m1 - pd1).double().sum(-1)
    f2 = (m2 - m1 * m1).double().sum(-1)
    if d2 is not None:
        f2 = f2 + (torch.einsum("knv,knv->kn", q, d2) - torch.einsum("nv,knv->kn", p, d2)).double().sum(-1)
    return f1, f2


def _newton_terms_linear(s: torch.Tensor, base: torch.Tensor, g: torch.Tensor, p: torch.Tensor,
                         pg: torch.Tensor | None = None):
    """:func:`_newton_terms` for logits linear in s, a = base + s·g: one exp and ~7 passes over [k, n, V]
    (a' = g, a'' = 0; the softmax is normalised through its sums; E_p[g] = ``pg`` when given)."""
    e = torch.addcmul(base.expand_as(g), g, s.view(-1, 1, 1).to(g.dtype))
    e.sub_(e.amax(-1, keepdim=True)).exp_()           # unnormalised softmax
    Z = e.sum(-1)                                     # [k, n]
    eg = e.mul_(g)
    m1 = eg.sum(-1) / Z                               # E_q[g]
    m2 = torch.einsum("knv,knv->kn", eg, g) / Z       # E_q[g²]
    pd1 = torch.einsum("nv,knv->kn", p, g) if pg is None else pg   # E_p[g]
    return (m1 - pd1).double().sum(-1), (m2 - m1 * m1).double().sum(-1)


@torch.no_grad()
def calibrate_scale(bank: LensBank, R: torch.Tensor, logp: torch.Tensor, c0: torch.Tensor,
                    dist: Distributed | None = None, steps: int = NEWTON_STEPS, progress: bool = False,
                    z: bool = False) -> torch.Tensor:
    """Fit a scale s per lens that minimises forward KL of the deviation from the null on the
    calibration positions (R [K, n, d] site results, or ``z``: their z [K, n, Dh], logp [n, V]): s multiplies the lens' residual-space
    vector (affine/lowrank, ``log_s``) or the deviation of the logits from the null (full). KL is convex
    in s when the logits are linear in s, so a few safeguarded Newton steps from s = 1 find it, within
    [S_MIN, S_MAX]. Shared lenses fit one s over their heads.
    Lenses read through the final norm are scale-invariant (N(s·x) = N(x)) and full lenses under
    soft-capping are not linear in s: both keep s = 1. Returns the chosen s per lens [L]."""
    L = bank.n_lenses
    dev_ = next(bank.parameters()).device
    cap = bank.model.logit_softcap
    if (bank.cfg.kind != "full" and bank.cfg.norm) or (bank.cfg.kind == "full" and cap):
        return torch.ones(L)
    c0 = c0.to(dev_).float()
    p = logp.to(dev_).float().exp()
    R = R.to(dev_)
    # chunks of whole lenses, so that a shared lens sees all its sites at once
    groups, group = [], []
    for li in range(L):
        group.append(li)
        if sum(int((bank.lens_index == l).sum()) for l in group) >= SITES_PER_CHUNK:
            groups.append(group)
            group = []
    if group:
        groups.append(group)
    best = torch.ones(L, dtype=torch.float64)
    # Safeguarded Newton on the derivative: KL is convex in s, so f'(s) changes sign once; keep a
    # bracket [lo, hi] of the root and bisect (geometrically) when a Newton step leaves it. Only the
    # derivatives are used (KL itself is a difference of large float32 sums). Every rank runs the same
    # chunks and steps; f' and f'' are summed over ranks.
    from tqdm import tqdm
    for lens_ids in tqdm(groups, desc="lens init (scale)", unit="chunk", disable=not progress, file=sys.stderr):
        sites = torch.cat([torch.nonzero(bank.lens_index == l).view(-1) for l in lens_ids])
        owner = bank.lens_index[sites]
        local = torch.tensor([lens_ids.index(int(o)) for o in owner.tolist()])
        a0, b, g = _scale_pieces(bank, R[sites.to(R.device)], owner, c0, rows=sites.tolist(), z=z)
        k = len(lens_ids)
        cur = torch.ones(k, dtype=torch.float64)
        lo, hi = torch.full((k,), S_MIN, dtype=torch.float64), torch.full((k,), S_MAX, dtype=torch.float64)
        pg = None if cap else torch.einsum("nv,knv->kn", p, g)   # E_p[g]: the same at every step
        for _ in range(steps):
            f1, f2 = _newton_terms(cur[local].float().to(g.device), a0, b, g, p, cap, pg)
            agg = torch.zeros(2, k, dtype=torch.float64)
            agg[0].index_add_(0, local, f1.cpu())
            agg[1].index_add_(0, local, f2.cpu())
            if dist is not None:
                dist.all_reduce(agg, "sum")
            f1, f2 = agg
            hi = torch.where(f1 > 0, torch.minimum(hi, cur), hi)
            lo = torch.where(f1 <= 0, torch.maximum(lo, cur), lo)
            newton = cur - f1 / f2.clamp_min(1e-30)
            inside = (f2 > 0) & (newton > lo) & (newton < hi)
            cur = torch.where(inside, newton, (lo * hi).sqrt())
        best[torch.tensor(lens_ids)] = cur
        del a0, g
    best = best.float()
    if bank.cfg.kind == "full":
        bank.W.mul_(best.view(-1, 1, 1).to(dev_))
        bank.beta.copy_(c0 + best.view(-1, 1).to(dev_) * (bank.beta - c0))
    else:  # logits = φ(W_U·(s·x) + b_U) + c: c is not scaled
        bank.log_s.add_(torch.log(best).to(dev_))
    return best


def kl_bits(nats: float) -> float:
    return nats / math.log(2)
