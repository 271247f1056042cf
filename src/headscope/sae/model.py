"""The sparse autoencoder on attention outputs (z), in every architecture SAELens ships (each one a module
of :mod:`.architectures`, which :class:`AttnSAE` asks for its maps and losses).

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
from .architectures import REGISTRY, default_matryoshka_widths, get  # noqa: F401
from .functions import TrainOutput, _batch_topk_flat, _JumpReLU, _SparseDecode, _Step  # noqa: F401
from .options import TRAINABLE  # noqa: F401  (re-exported)

ARCHITECTURES = tuple(REGISTRY)
"""Every architecture headscope reads (:mod:`.architectures`, one module each)."""
THRESHOLDED = tuple(name for name, a in REGISTRY.items() if a.thresholded)
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
        arch = get(self.architecture)
        if self.d_in != self.n_heads * self.d_head:
            raise HeadscopeError(f"d_in {self.d_in} is not n_heads·d_head = {self.n_heads}·{self.d_head}")
        if self.d_sae < 1:
            raise HeadscopeError(f"d_sae must be positive, got {self.d_sae}")
        arch.check(self)   # k, Matryoshka widths
        if self.head_index is not None and not 0 <= self.head_index < self.n_heads:
            raise HeadscopeError(f"head_index {self.head_index} is not a head of a {self.n_heads}-head layer")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def hook_name(self) -> str:
        """TransformerLens name of the site (``blocks.L.attn.hook_z``)."""
        return f"blocks.{self.layer}.attn.hook_z"


def param_names(architecture: str) -> list[str]:
    """Tensors that define an SAE of ``architecture`` (gated: ``b_enc`` is SAELens' ``b_gate``)."""
    return get(architecture).param_names


class SAEOutput(NamedTuple):
    """``recon`` [N, d_in], ``acts`` [N, F] (post-activation), ``pre`` [N, F] (pre-activation)."""

    recon: torch.Tensor
    acts: torch.Tensor
    pre: torch.Tensor


class AttnSAE(nn.Module):
    """An SAE on one layer's z. ``forward(x [N, d_in]) -> SAEOutput`` is the inference map of every
    architecture; :meth:`train_forward` is the training map (BatchTopK over the batch)."""

    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.arch = get(cfg.architecture)
        """The architecture object (:mod:`.architectures`) every map below asks."""
        self._last_cut = 0.0   # BatchTopK training: the last batch's cut (a guess for the next, not state)
        g = torch.Generator().manual_seed(seed)
        d, F = cfg.d_in, cfg.d_sae
        # Kaiming-uniform init as the reference code (nn.init.kaiming_uniform_ on [d_in, F] / [F, d_in])
        W_dec = (torch.rand(F, d, generator=g) * 2 - 1) * math.sqrt(6.0 / d)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        if self.arch.encoder_from_decoder:
            W_enc = W_dec.T.clone()  # Gao et al. / SAELens: encoder initialised to the decoder's transpose
        else:
            W_enc = (torch.rand(d, F, generator=g) * 2 - 1) * math.sqrt(6.0 / F)
        self.W_enc = nn.Parameter(W_enc.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.W_dec = nn.Parameter(W_dec.contiguous())
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.arch.init_extra(self, F)   # threshold (JumpReLU, BatchTopK), r_mag/b_mag (gated)
        if cfg.head_index is not None:
            keep = torch.zeros(cfg.n_heads, cfg.d_head)
            keep[cfg.head_index] = 1
            self.register_buffer("_head_mask", keep.reshape(-1), persistent=False)

    def param_names(self) -> list[str]:
        """Tensors that define the map (what is saved)."""
        return self.arch.param_names

    # -- the map -----------------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations [N, F] of z ``x`` [N, d_in] (or [N, H, Dh], flattened head-major).
        Gated: the magnitude path's pre-activations."""
        return self.arch.pre_acts(self, self._flat(x))

    def activation(self, pre: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Inference activations from pre-activations (gated also needs ``x`` for its gate)."""
        return self.arch.activation(self, pre, x)

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
        recon, acts = self.arch.forward(self, x, pre)
        if self.cfg.head_index is not None:
            recon = recon + x * (1 - self._head_mask)
        return SAEOutput(recon, acts, pre)

    def train_forward(self, x: torch.Tensor, sparse: bool = True) -> "TrainOutput":
        """The training map on a batch x [N, d_in]: BatchTopK keeps the k·N largest activations of the
        batch; JumpReLU passes the threshold's straight-through gradient; others as :meth:`forward`.
        TopK and BatchTopK run sparse (:mod:`.sparse`: one dense matmul per step) unless ``sparse=False``."""
        if not self.arch.trainable:
            raise HeadscopeError(f"SAE architecture '{self.cfg.architecture}' can be loaded but not trained here")
        return self.arch.train_forward(self, x, sparse)

    def _sparse_train_forward(self, x: torch.Tensor) -> "TrainOutput":
        from .sparse import Entries, SparseDecode, SparseEncode
        N, F = x.shape[0], self.cfg.d_sae
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)
            rows, cols, pv = self.arch.sparse_select(self, pre)   # TopK: per token; BatchTopK: per batch
        ent = Entries(rows, cols, N, F)
        v = SparseEncode.apply(x, self.b_dec, self.W_enc, self.b_enc, pv, ent).relu()
        recon = SparseDecode.apply(v, self.W_dec, ent) + self.b_dec
        return TrainOutput(recon, pre, vals=v, ent=ent, x=x)

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
        mse = torch.nn.functional.mse_loss(out.recon, x, reduction="sum") / x.shape[0]
        return self.arch.loss(self, x, out, mse, {"mse": mse}, l1_coeff=l1_coeff, dead=dead, k_aux=k_aux,
                              aux_coeff=aux_coeff, l0_coeff=l0_coeff)

    @torch.no_grad()
    def after_step(self, out: TrainOutput, threshold_lr: float = 0.01) -> None:
        """Per-step updates outside the optimiser: BatchTopK's threshold ← running mean of the smallest
        activation kept in the batch (as SAELens); JumpReLU's threshold kept ≥ 0."""
        self.arch.after_step(self, out, threshold_lr)

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
        W = self.arch.encoder_weight(self)
        return W.reshape(H, Dh, -1)
