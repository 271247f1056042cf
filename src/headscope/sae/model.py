"""The sparse autoencoder on attention outputs (z), in every architecture SAELens ships.

Shapes: N tokens, d_in = H·Dh (z flattened head-major, i.e. ordered (n_heads, d_head)), F = d_sae.

* pre-activation  ``pre = (x − b_dec) · W_enc + b_enc``            [N, F]
* decoder         ``x̂ = f · W_dec + b_dec``                      [N, d_in]

Feature activations ``f`` at inference (``encode``), per architecture:

* ``standard``  ``f = ReLU(pre)``; trained with ``Σ_d (x̂ − x)² + λ · Σ_F |f|`` (Kissane et al.)
* ``topk``      ``f = ReLU(TopK_k(pre))`` per token; trained with MSE + α · AuxK (Gao et al. 2024)
* ``jumprelu``  ``f = ReLU(pre) · [pre > θ_F]`` with a learned threshold per feature; trained with
                MSE + λ · L0, the L0 and the threshold's gradient through a straight-through estimator
                with a rectangle kernel of width ``bandwidth`` (Rajamanoharan et al. 2024, SAELens' "step")
* ``batchtopk`` training: the k·N largest ReLU(pre) over the whole batch (Bussmann et al. 2024) + AuxK;
                inference: a JumpReLU whose threshold (the same for all features) is the running mean of
                the smallest kept activation, as SAELens saves it
* ``matryoshka_batchtopk`` as BatchTopK, and every prefix ``f[:, :w]`` for w in ``matryoshka_widths``
                is trained to reconstruct x on its own (Bussmann et al. 2025 / Nabeshima 2025)
* ``gated``     (loaded, not trained) ``f = [(x−b_dec)·W_enc + b_gate > 0] · ReLU((x−b_dec)·(W_enc ⊙
                exp(r_mag)) + b_mag)`` (Rajamanoharan et al. 2024a); ``b_enc`` holds b_gate.

``head_index`` (loaded per-head SAEs, SAELens' ``hook_head_index``): the Dh-wide SAE is embedded in the
H·Dh space (encoder/decoder rows of other heads are zero); ``forward`` passes the other heads' z through
unchanged, so splicing ``recon`` replaces head h only.

Decoder rows are kept at unit norm during training: before each optimiser step the gradient component
parallel to each row is removed (:meth:`AttnSAE.remove_parallel_grad`), after it the rows are
renormalised (:meth:`AttnSAE.normalize_decoder`). Weights are stored as SAELens stores them
(``W_enc [d_in, F]``, ``b_enc [F]``, ``W_dec [F, d_in]``, ``b_dec [d_in]``, ``threshold [F]``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from ..errors import HeadscopeError
from .options import TRAINABLE

ARCHITECTURES = ("standard", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk", "gated")
THRESHOLDED = ("jumprelu", "batchtopk", "matryoshka_batchtopk")
"""Architectures whose inference map is a JumpReLU (a ``threshold`` [F])."""


@dataclass
class SAEConfig:
    """What an SAE is, independent of how it was trained."""

    d_in: int
    """Input width, H·Dh (z of one layer, head-major)."""
    d_sae: int
    """Number of features F."""
    n_heads: int
    """Query heads H of the layer (d_in = n_heads · d_head)."""
    d_head: int
    """Head dimension Dh."""
    layer: int
    """Layer whose z the SAE reads."""
    architecture: str = "standard"
    """One of :data:`ARCHITECTURES`."""
    k: int = 32
    """TopK: active features per token; BatchTopK: mean active features per token while training."""
    model: dict = field(default_factory=dict)
    """Identity of the model the SAE was trained on (``Model.identity()``)."""
    context_size: int = 128
    """Sequence length of the training data."""
    dataset: str = "default"
    """Corpus spec of the training data."""
    matryoshka_widths: list = field(default_factory=list)
    """Matryoshka: strictly increasing prefix widths, the last = d_sae."""
    bandwidth: float = 0.05
    """JumpReLU: width of the straight-through estimator's rectangle kernel (training only)."""
    head_index: int | None = None
    """A per-head SAE (reads z of this head only, embedded in the H·Dh space); None: whole layer."""

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise HeadscopeError(f"unknown SAE architecture '{self.architecture}' (choose from {', '.join(ARCHITECTURES)})")
        if self.d_in != self.n_heads * self.d_head:
            raise HeadscopeError(f"d_in {self.d_in} is not n_heads·d_head = {self.n_heads}·{self.d_head}")
        if self.d_sae < 1:
            raise HeadscopeError(f"d_sae must be positive, got {self.d_sae}")
        if self.architecture in ("topk", "batchtopk", "matryoshka_batchtopk") and not 1 <= self.k <= self.d_sae:
            raise HeadscopeError(f"k must be in 1..d_sae={self.d_sae}, got {self.k}")
        if self.architecture == "matryoshka_batchtopk":
            w = [int(v) for v in self.matryoshka_widths] or default_matryoshka_widths(self.d_sae)
            if w[-1] != self.d_sae:
                w.append(self.d_sae)
            if w[0] < 1 or any(b <= a for a, b in zip(w, w[1:])) or w[-1] != self.d_sae:
                raise HeadscopeError(f"matryoshka widths must increase strictly from ≥1 to d_sae={self.d_sae}, got {w}")
            self.matryoshka_widths = w
        else:
            self.matryoshka_widths = []
        if self.head_index is not None and not 0 <= self.head_index < self.n_heads:
            raise HeadscopeError(f"head_index {self.head_index} is not a head of a {self.n_heads}-head layer")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def hook_name(self) -> str:
        """TransformerLens name of the site (``blocks.L.attn.hook_z``)."""
        return f"blocks.{self.layer}.attn.hook_z"


def default_matryoshka_widths(d_sae: int) -> list[int]:
    """Nested prefixes 1/16, 1/8, 1/4, 1/2 and all of the dictionary (duplicates and zeros dropped)."""
    w = sorted({max(1, d_sae // 16), max(1, d_sae // 8), max(1, d_sae // 4), max(1, d_sae // 2), d_sae})
    return w


def param_names(architecture: str) -> list[str]:
    """Tensors that define an SAE of ``architecture`` (gated: ``b_enc`` is SAELens' ``b_gate``)."""
    names = ["W_enc", "b_enc", "W_dec", "b_dec"]
    if architecture in THRESHOLDED:
        names.append("threshold")
    if architecture == "gated":
        names += ["r_mag", "b_mag"]
    return names


class SAEOutput(NamedTuple):
    """``recon`` [N, d_in], ``acts`` [N, F] (post-activation), ``pre`` [N, F] (pre-activation)."""

    recon: torch.Tensor
    acts: torch.Tensor
    pre: torch.Tensor


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


class AttnSAE(nn.Module):
    """An SAE on one layer's z. ``forward(x [N, d_in]) -> SAEOutput`` is the inference map of every
    architecture; :meth:`train_forward` is the training map (BatchTopK over the batch)."""

    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self._last_cut = 0.0   # BatchTopK training: the last batch's cut (a guess for the next, not state)
        g = torch.Generator().manual_seed(seed)
        d, F = cfg.d_in, cfg.d_sae
        # Kaiming-uniform init as the reference code (nn.init.kaiming_uniform_ on [d_in, F] / [F, d_in])
        W_dec = (torch.rand(F, d, generator=g) * 2 - 1) * math.sqrt(6.0 / d)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        if cfg.architecture in ("topk", "batchtopk", "matryoshka_batchtopk", "jumprelu"):
            W_enc = W_dec.T.clone()  # Gao et al. / SAELens: encoder initialised to the decoder's transpose
        else:
            W_enc = (torch.rand(d, F, generator=g) * 2 - 1) * math.sqrt(6.0 / F)
        self.W_enc = nn.Parameter(W_enc.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.W_dec = nn.Parameter(W_dec.contiguous())
        self.b_dec = nn.Parameter(torch.zeros(d))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.full((F,), 0.01))   # SAELens' jumprelu_init_threshold
        elif cfg.architecture in THRESHOLDED:
            self.register_buffer("threshold", torch.zeros(F))        # BatchTopK: set by update_threshold
        if cfg.architecture == "gated":
            self.r_mag = nn.Parameter(torch.zeros(F))
            self.b_mag = nn.Parameter(torch.zeros(F))
        if cfg.head_index is not None:
            keep = torch.zeros(cfg.n_heads, cfg.d_head)
            keep[cfg.head_index] = 1
            self.register_buffer("_head_mask", keep.reshape(-1), persistent=False)

    def param_names(self) -> list[str]:
        """Tensors that define the map (what is saved)."""
        return param_names(self.cfg.architecture)

    # -- the map -----------------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations [N, F] of z ``x`` [N, d_in] (or [N, H, Dh], flattened head-major).
        Gated: the magnitude path's pre-activations."""
        x = self._flat(x)
        if self.cfg.architecture == "gated":
            return (x - self.b_dec) @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Inference activations from pre-activations (gated also needs ``x`` for its gate)."""
        a = self.cfg.architecture
        if a == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        if a in THRESHOLDED:
            return pre.relu() * (pre > self.threshold)
        if a == "gated":
            gate = (self._flat(x) - self.b_dec) @ self.W_enc + self.b_enc
            return (gate > 0) * pre.relu()
        return pre.relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [N, F]."""
        x = self._flat(x)
        return self.activation(self.pre_acts(x), x)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction [N, d_in] from activations [N, F] (per-head SAEs: zero outside their head)."""
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> SAEOutput:
        x = self._flat(x)
        pre = self.pre_acts(x)
        if self.cfg.architecture == "topk" and x.dim() == 2:
            recon, acts = self._topk_decode(pre)
        else:
            acts = self.activation(pre, x)
            recon = self.decode(acts)
        if self.cfg.head_index is not None:
            recon = recon + x * (1 - self._head_mask)
        return SAEOutput(recon, acts, pre)

    def train_forward(self, x: torch.Tensor, sparse: bool = True) -> "TrainOutput":
        """The training map on a batch x [N, d_in]: BatchTopK keeps the k·N largest activations of the
        batch; JumpReLU passes the threshold's straight-through gradient; others as :meth:`forward`.
        TopK and BatchTopK run sparse (:mod:`.sparse`: one dense matmul per step) unless ``sparse=False``."""
        a = self.cfg.architecture
        if a not in TRAINABLE:
            raise HeadscopeError(f"SAE architecture '{a}' can be loaded but not trained here")
        if sparse and a in ("topk", "batchtopk") and x.dim() == 2:
            return self._sparse_train_forward(x)
        pre = self.pre_acts(x)
        if a == "topk":
            recon, acts = self._topk_decode(pre)
        elif a in ("batchtopk", "matryoshka_batchtopk"):
            r = pre.relu()
            vals, flat = r.flatten().topk(self.cfg.k * x.shape[0], sorted=False)
            acts = torch.zeros_like(r).flatten().scatter(0, flat, vals).reshape(r.shape)
            recon = self.decode(acts)
        elif a == "jumprelu":
            acts = _JumpReLU.apply(pre, self.threshold, self.cfg.bandwidth)  # θ ≥ 0: = ReLU(pre)·[pre > θ]
            recon = self.decode(acts)
        else:
            acts = pre.relu()
            recon = self.decode(acts)
        return TrainOutput(recon, pre, acts=acts)

    def _sparse_train_forward(self, x: torch.Tensor) -> "TrainOutput":
        from .sparse import Entries, SparseDecode, SparseEncode
        N, F = x.shape[0], self.cfg.d_sae
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)
            if self.cfg.architecture == "topk":
                pv, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
                rows = torch.arange(N, device=x.device).repeat_interleave(self.cfg.k)
                cols, pv = idx.reshape(-1), pv.reshape(-1)
            else:
                # the guess: below the previous step's cut (it moves by a few % a step)
                flat = _batch_topk_flat(pre, self.cfg.k * N, 0.8 * self._last_cut)
                rows, cols = flat // F, flat % F
                pv = pre.flatten()[flat]
                self._last_cut = max(0.0, float(pv.min())) if pv.numel() else 0.0
        ent = Entries(rows, cols, N, F)
        v = SparseEncode.apply(x, self.b_dec, self.W_enc, self.b_enc, pv, ent).relu()
        recon = SparseDecode.apply(v, self.W_dec, ent) + self.b_dec
        return TrainOutput(recon, pre, vals=v, ent=ent, x=x)

    def _topk_decode(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # sparse decode: gather the k decoder rows of each token instead of a dense [N, F] matmul
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        vals = vals.relu()
        acts = torch.zeros_like(pre).scatter(-1, idx, vals)
        return _SparseDecode.apply(vals, idx, self.W_dec) + self.b_dec, acts

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.cfg.d_in:
            if x.dim() >= 2 and x.shape[-2:] == (self.cfg.n_heads, self.cfg.d_head):
                return x.reshape(*x.shape[:-2], self.cfg.d_in)
            raise HeadscopeError(f"SAE expects inputs of width d_in={self.cfg.d_in} "
                                 f"({self.cfg.n_heads} heads × {self.cfg.d_head}), got shape {tuple(x.shape)}")
        return x

    # -- losses ------------------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, out: TrainOutput, l1_coeff: float = 0.0, dead: torch.Tensor | None = None,
             k_aux: int = 256, aux_coeff: float = 1 / 32, l0_coeff: float = 0.0) -> dict[str, torch.Tensor]:
        """Training losses (mean over tokens) of ``out = train_forward(x)``. ``dead``: bool [F] mask of
        dead features (AuxK). ``l1_coeff``: standard; ``l0_coeff``: JumpReLU."""
        a = self.cfg.architecture
        mse = torch.nn.functional.mse_loss(out.recon, x, reduction="sum") / x.shape[0]
        losses = {"mse": mse}
        if a == "standard":
            losses["l1"] = out.acts.abs().sum(-1).mean()
            losses["loss"] = mse + l1_coeff * losses["l1"]
            return losses
        if a == "jumprelu":
            losses["l0"] = _Step.apply(out.pre, self.threshold, self.cfg.bandwidth).sum(-1).mean()
            losses["loss"] = mse + l0_coeff * losses["l0"]
            return losses
        total = mse
        if a == "matryoshka_batchtopk":
            # every inner prefix reconstructs x on its own (SAELens: summed with the outer MSE)
            rec = self.b_dec
            prev = 0
            for w in self.cfg.matryoshka_widths[:-1]:
                rec = rec + out.acts[:, prev:w] @ self.W_dec[prev:w]
                losses[f"mse_{w}"] = (rec - x).pow(2).sum(-1).mean()
                total = total + losses[f"mse_{w}"]
                prev = w
        aux = torch.zeros((), device=x.device)
        if dead is not None and bool(dead.any()):
            # AuxK: the k_aux largest pre-activations of dead features reconstruct the residual
            dead_idx = dead.nonzero().flatten()
            n_dead = dead_idx.numel()
            ka = min(k_aux, n_dead)
            target = (x - out.recon).detach()
            if getattr(out, "ent", None) is not None:
                # sparse step (pre has no graph): dense matmuls restricted to the dead columns, the encoder
                # side written x·W_e + (b_enc − b_dec·W_e) so that x needs no [N, d] gradient. Profiled
                # cheaper than sparse entries (N·k_aux of them) once hundreds of features are dead.
                W_e = self.W_enc[:, dead_idx]
                pre_d = torch.addmm(self.b_enc[dead_idx] - self.b_dec @ W_e, x, W_e)         # [N, n_dead]
                vals, j = pre_d.topk(ka, dim=-1, sorted=False)
                aux_rec = torch.zeros_like(pre_d).scatter(-1, j, vals.relu()) @ self.W_dec[dead_idx]
            else:
                vals, j = out.pre[:, dead_idx].topk(ka, dim=-1, sorted=False)
                aux_rec = _SparseDecode.apply(vals.relu(), dead_idx[j], self.W_dec)
            # as SAELens: scaled down while few features are dead
            aux = (aux_rec - target).pow(2).sum(-1).mean() * min(n_dead / k_aux, 1.0)
        losses["aux"] = aux
        losses["loss"] = total + aux_coeff * aux
        return losses

    @torch.no_grad()
    def after_step(self, out: TrainOutput, threshold_lr: float = 0.01) -> None:
        """Per-step updates outside the optimiser: BatchTopK's threshold ← running mean of the smallest
        activation kept in the batch (as SAELens); JumpReLU's threshold kept ≥ 0."""
        a = self.cfg.architecture
        if a in ("batchtopk", "matryoshka_batchtopk"):
            m = out.min_positive()
            if m is not None:
                if not bool(self.threshold.any()):   # first update: start at the value, not at 0 (SAELens
                    self.threshold.fill_(m)          # starts at 0, which biases short runs' threshold low)
                else:
                    self.threshold.mul_(1 - threshold_lr).add_(threshold_lr * m)
        elif a == "jumprelu":
            self.threshold.clamp_(min=0.0)

    # -- decoder norm ------------------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Remove from W_dec's gradient the component parallel to each (unit) decoder row."""
        if self.W_dec.grad is None:
            return
        par = torch.einsum("fd,fd->f", self.W_dec.grad, self.W_dec)
        self.W_dec.grad.addcmul_(par[:, None], self.W_dec, value=-1.0)

    # -- head structure ----------------------------------------------------------------------------
    def head_blocks(self, which: str = "dec") -> torch.Tensor:
        """Per-head blocks: ``dec`` → W_dec as [F, H, Dh]; ``enc`` → the encoder (gated: its magnitude
        path) as [H, Dh, F]."""
        H, Dh = self.cfg.n_heads, self.cfg.d_head
        if which == "dec":
            return self.W_dec.reshape(-1, H, Dh)
        W = self.W_enc * self.r_mag.exp() if self.cfg.architecture == "gated" else self.W_enc
        return W.reshape(H, Dh, -1)
