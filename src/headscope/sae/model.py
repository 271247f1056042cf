"""The sparse autoencoder on attention outputs (z): ReLU + L1 (Kissane et al.) and TopK (Gao et al.).

Shapes: N tokens, d_in = H·Dh (z flattened head-major, i.e. ordered (n_heads, d_head)), F = d_sae.

* pre-activation  ``pre = (x − b_dec) · W_enc + b_enc``            [N, F]
* ``standard``:   ``f = ReLU(pre)``; loss ``Σ_d (x̂ − x)² + λ · Σ_F |f|`` (mean over tokens)
* ``topk``:       ``f = ReLU(TopK_k(pre))`` (the k largest pre-activations, then ReLU, as SAELens);
                  loss ``Σ_d (x̂ − x)² + α · AuxK`` where AuxK reconstructs the residual x − x̂ from the
                  ``k_aux`` largest pre-activations of dead features (Gao et al. 2024)
* decoder         ``x̂ = f · W_dec + b_dec``                      [N, d_in]

Decoder rows are kept at unit norm: before each optimiser step the gradient component parallel to
each row is removed (:meth:`AttnSAE.remove_parallel_grad`), after it the rows are renormalised
(:meth:`AttnSAE.normalize_decoder`). Weights are stored as SAELens stores them
(``W_enc [d_in, F]``, ``W_dec [F, d_in]``, ``b_enc [F]``, ``b_dec [d_in]``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from ..errors import HeadscopeError

ARCHITECTURES = ("standard", "topk")


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
    """``standard`` (ReLU + L1) or ``topk``."""
    k: int = 32
    """TopK only: active features per token."""
    model: dict = field(default_factory=dict)
    """Identity of the model the SAE was trained on (``Model.identity()``)."""
    context_size: int = 128
    """Sequence length of the training data."""
    dataset: str = "default"
    """Corpus spec of the training data."""

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise HeadscopeError(f"unknown SAE architecture '{self.architecture}' (choose from {', '.join(ARCHITECTURES)})")
        if self.d_in != self.n_heads * self.d_head:
            raise HeadscopeError(f"d_in {self.d_in} is not n_heads·d_head = {self.n_heads}·{self.d_head}")
        if self.d_sae < 1:
            raise HeadscopeError(f"d_sae must be positive, got {self.d_sae}")
        if self.architecture == "topk" and not 1 <= self.k <= self.d_sae:
            raise HeadscopeError(f"k must be in 1..d_sae={self.d_sae}, got {self.k}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def hook_name(self) -> str:
        """TransformerLens name of the site (``blocks.L.attn.hook_z``)."""
        return f"blocks.{self.layer}.attn.hook_z"


class SAEOutput(NamedTuple):
    """``recon`` [N, d_in], ``acts`` [N, F] (post-activation), ``pre`` [N, F] (pre-activation)."""

    recon: torch.Tensor
    acts: torch.Tensor
    pre: torch.Tensor


class _SparseDecode(torch.autograd.Function):
    """recon[n] = Σ_j vals[n, j] · W_dec[idx[n, j]] with a deterministic backward (index_add_ in index
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


class AttnSAE(nn.Module):
    """An SAE on one layer's z. ``forward(x [N, d_in]) -> SAEOutput``."""

    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)
        d, F = cfg.d_in, cfg.d_sae
        # Kaiming-uniform init as the reference code (nn.init.kaiming_uniform_ on [d_in, F] / [F, d_in])
        W_dec = (torch.rand(F, d, generator=g) * 2 - 1) * math.sqrt(6.0 / d)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        if cfg.architecture == "topk":
            W_enc = W_dec.T.clone()  # Gao et al.: encoder initialised to the decoder's transpose
        else:
            W_enc = (torch.rand(d, F, generator=g) * 2 - 1) * math.sqrt(6.0 / F)
        self.W_enc = nn.Parameter(W_enc.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.W_dec = nn.Parameter(W_dec.contiguous())
        self.b_dec = nn.Parameter(torch.zeros(d))

    # -- the map -----------------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations [N, F] of z ``x`` [N, d_in] (or [N, H, Dh], flattened head-major)."""
        x = self._flat(x)
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Feature activations from pre-activations (ReLU, or TopK then ReLU)."""
        if self.cfg.architecture == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        return pre.relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [N, F]."""
        return self.activation(self.pre_acts(x))

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction [N, d_in] from activations [N, F]."""
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> SAEOutput:
        x = self._flat(x)
        pre = self.pre_acts(x)
        if self.cfg.architecture == "topk" and x.dim() == 2:
            # sparse decode: gather the k decoder rows of each token instead of a dense [N, F] matmul
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            vals = vals.relu()
            acts = torch.zeros_like(pre).scatter(-1, idx, vals)
            recon = _SparseDecode.apply(vals, idx, self.W_dec) + self.b_dec
            return SAEOutput(recon, acts, pre)
        acts = self.activation(pre)
        return SAEOutput(self.decode(acts), acts, pre)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.cfg.d_in:
            if x.dim() >= 2 and x.shape[-2:] == (self.cfg.n_heads, self.cfg.d_head):
                return x.reshape(*x.shape[:-2], self.cfg.d_in)
            raise HeadscopeError(f"SAE expects inputs of width d_in={self.cfg.d_in} "
                                 f"({self.cfg.n_heads} heads × {self.cfg.d_head}), got shape {tuple(x.shape)}")
        return x

    # -- losses ------------------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, out: SAEOutput, l1_coeff: float = 0.0, dead: torch.Tensor | None = None,
             k_aux: int = 256, aux_coeff: float = 1 / 32) -> dict[str, torch.Tensor]:
        """Training losses (mean over tokens). ``dead``: bool [F] mask of dead features (TopK AuxK)."""
        err = out.recon - x
        mse = err.pow(2).sum(-1).mean()
        losses = {"mse": mse}
        if self.cfg.architecture == "standard":
            losses["l1"] = out.acts.abs().sum(-1).mean()
            losses["loss"] = mse + l1_coeff * losses["l1"]
        else:
            aux = torch.zeros((), device=x.device)
            if dead is not None and bool(dead.any()):
                n_dead = int(dead.sum())
                ka = min(k_aux, n_dead)
                pre_dead = out.pre.masked_fill(~dead, float("-inf"))
                vals, idx = pre_dead.topk(ka, dim=-1, sorted=False)
                aux_acts = torch.zeros_like(out.pre).scatter_(-1, idx, vals.relu())
                target = (x - out.recon).detach()
                aux_rec = aux_acts @ self.W_dec
                # as SAELens: scaled down while few features are dead
                aux = (aux_rec - target).pow(2).sum(-1).mean() * min(n_dead / k_aux, 1.0)
            losses["aux"] = aux
            losses["loss"] = mse + aux_coeff * aux
        return losses

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
        par = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
        self.W_dec.grad.sub_(par * self.W_dec)

    # -- head structure ----------------------------------------------------------------------------
    def head_blocks(self, which: str = "dec") -> torch.Tensor:
        """Per-head blocks: ``dec`` → W_dec as [F, H, Dh]; ``enc`` → W_enc as [H, Dh, F]."""
        H, Dh = self.cfg.n_heads, self.cfg.d_head
        if which == "dec":
            return self.W_dec.reshape(-1, H, Dh)
        return self.W_enc.reshape(H, Dh, -1)
