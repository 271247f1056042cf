"""The SAE's differentiable pieces shared by its architectures (:mod:`.architectures`): the training
output, the deterministic sparse decode, the JumpReLU and step functions with their straight-through
gradients, and BatchTopK's batch-wide selection. Shapes: N tokens, F = d_sae, d = d_in."""

from __future__ import annotations

import torch


class TrainOutput:
    """What :meth:`AttnSAE.train_forward` returns: ``recon`` [N, d_in], ``pre`` [N, F] and the
    activations, dense (``acts``) or as sparse entries (``ent``: rows/cols, ``vals`` [M])."""

    def __init__(self, recon, pre, acts=None, vals=None, ent=None, x=None):
        self.recon, self.pre, self._acts, self.vals, self.ent, self.x = recon, pre, acts, vals, ent, x

    @property
    def acts(self) -> torch.Tensor:
        """Dense activations [N, F] (built on demand from the sparse entries, without gradient)."""
        if self._acts is None:
            a = torch.zeros(self.ent.n_rows * self.ent.n_cols, dtype=self.vals.dtype, device=self.vals.device)
            a[self.ent.rows * self.ent.n_cols + self.ent.cols] = self.vals.detach()
            self._acts = a.reshape(self.ent.n_rows, self.ent.n_cols)
        return self._acts

    @torch.no_grad()
    def fired(self) -> torch.Tensor:
        """[F] long: tokens of the batch on which each feature fired."""
        if self.ent is not None:
            return torch.bincount(self.ent.cols[self.vals > 0], minlength=self.ent.n_cols)
        return (self._acts > 0).sum(0)

    @torch.no_grad()
    def l0(self) -> float:
        """Mean number of active features per token."""
        if self.ent is not None:
            return float((self.vals > 0).sum()) / self.ent.n_rows
        return float((self._acts > 0).float().sum(-1).mean())

    @torch.no_grad()
    def min_positive(self) -> float | None:
        v = self.vals if self.ent is not None else self._acts
        v = v[v > 0]
        return float(v.min()) if v.numel() else None


class _SparseDecode(torch.autograd.Function):
    """recon[n] = Σ_j vals[n, j] · W_dec[idx[n, j]], with a deterministic backward (index_add_ in index
    order), so that TopK training is bit-for-bit reproducible and resumable."""

    @staticmethod
    def forward(ctx, vals, idx, W_dec):
        ctx.save_for_backward(vals, idx, W_dec)
        return torch.einsum("nk,nkd->nd", vals, W_dec[idx])

    @staticmethod
    def backward(ctx, grad):
        vals, idx, W_dec = ctx.saved_tensors
        g_vals = torch.einsum("nd,nkd->nk", grad, W_dec[idx])
        g_W = torch.zeros_like(W_dec).index_add_(0, idx.reshape(-1), (vals[..., None] * grad[:, None]).reshape(-1, W_dec.shape[1]))
        return g_vals, None, g_W


def _rect(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``pre · [pre > θ]``; d/dpre = [pre > θ]; d/dθ = −(θ/ε)·rect((pre−θ)/ε) (straight-through)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        g_theta = -((theta / ctx.eps) * _rect((pre - theta) / ctx.eps) * grad).sum(0)
        return (pre > theta) * grad, g_theta, None


class _Step(torch.autograd.Function):
    """``[pre > θ]``; d/dθ = −(1/ε)·rect((pre−θ)/ε), no gradient to pre (SAELens' default)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        return None, -((1.0 / ctx.eps) * _rect((pre - theta) / ctx.eps) * grad).sum(0), None


def _batch_topk_flat(r: torch.Tensor, n: int, guess: float = 0.0) -> torch.Tensor:
    """Sorted flat indices of the ``n`` largest entries of ``relu(r)`` (``r`` [N, F]).

    With a ``guess`` > 0 below the cut (training passes 0.8 × the previous batch's cut): the entries above
    it, in index order (``nonzero`` keeps them sorted), then the cut as a k-th value among those few —
    no top-k over rows and no sort; exact whenever between n and 4n entries pass the guess and the cut
    has no ties, else the general path. General path: candidates first (each row's 4·n/N largest, then
    the n largest candidates); exact unless some row has all its candidates above the cut, in which
    case the whole matrix is searched (a top-n over N·F values is ~10× slower on CPU)."""
    N, F = r.shape
    if guess > 0:
        flat = r.reshape(-1)
        idx = (flat > guess).nonzero().squeeze(1)
        c = idx.numel()
        if n <= c <= 4 * n:
            vals = flat[idx]
            keep = vals >= vals.kthvalue(c - n + 1).values
            if int(keep.sum()) == n:
                return idx[keep]
    r = r.relu()
    k2 = min(F, 4 * max(1, n // N))
    if k2 < F:
        cv, ci = r.topk(k2, dim=-1, sorted=False)
        v, pos = cv.flatten().topk(n, sorted=False)
        cut = v.min()
        row_min = cv.min(-1).values
        if not bool((row_min > cut).any() or ((row_min == cut) & (cut > 0)).any()):
            flat = (pos // k2) * F + ci.flatten()[pos]
            return _sorted(flat)
    return _sorted(r.flatten().topk(n, sorted=False).indices)


def _sorted(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":   # torch's CPU sort was ~40× slower than numpy's here (profiled, under load)
        import numpy as np
        return torch.from_numpy(np.sort(t.numpy()))
    return t.sort().values
