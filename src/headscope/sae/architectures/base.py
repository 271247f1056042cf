"""What an SAE architecture is: its parameters, its inference map, its training map and losses, and what
it writes to / reads from SAELens' format. :class:`headscope.sae.model.AttnSAE`, the trainer and the
SAELens IO ask the architecture object (:func:`headscope.sae.architectures.get`) instead of branching on
its name. The base class is the ReLU SAE; each architecture overrides what differs.

Shapes: N tokens, d_in = H·Dh, F = d_sae; ``sae`` is the :class:`~headscope.sae.model.AttnSAE`."""

from __future__ import annotations

import torch

from ...errors import HeadscopeError
from ..functions import TrainOutput, _SparseDecode

BASE_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


class Architecture:
    """The ReLU SAE's behaviour; subclasses override what differs."""

    name: str = ""
    trainable: bool = True
    """headscope trains it (else it can only be imported)."""
    uses_k: bool = False
    """k (active features per token, or on average over a batch) is part of the architecture."""
    thresholded: bool = False
    """Its inference map is a JumpReLU with a ``threshold`` [F] (written to SAELens as ``jumprelu``)."""
    encoder_from_decoder: bool = False
    """The encoder starts as the decoder's transpose (Gao et al. / SAELens), else Kaiming-uniform."""
    extra_params: tuple[str, ...] = ()
    """Tensors beyond W_enc, b_enc, W_dec, b_dec that define the map (saved and loaded)."""
    sweep_knob: tuple[str, str] | None = None
    """``sae sweep``: (the TrainOptions field swept, the short name in the swept SAEs' names)."""
    resamples_dead: bool = False
    """The trainer resamples dead features (``--resample-every``; the L1 SAE's remedy, AuxK's is its loss)."""
    saelens_renames: dict[str, str] = {}
    """headscope tensor name → SAELens' name where they differ (gated: b_enc is SAELens' b_gate)."""

    # -- configuration ---------------------------------------------------------------------------
    def check(self, cfg) -> None:
        """Check (and complete) an :class:`~headscope.sae.model.SAEConfig` of this architecture."""
        if self.uses_k and not 1 <= cfg.k <= cfg.d_sae:
            raise HeadscopeError(f"k must be in 1..d_sae={cfg.d_sae}, got {cfg.k}")
        cfg.matryoshka_widths = []

    @property
    def param_names(self) -> list[str]:
        return list(BASE_PARAMS) + list(self.extra_params)

    @property
    def saelens_name(self) -> str:
        """The ``architecture`` written to SAELens' cfg.json (the inference form)."""
        return "jumprelu" if self.thresholded else self.name

    def saelens_fields(self, cfg) -> dict:
        """Extra top-level cfg.json fields SAELens reads for this architecture."""
        return {}

    def headscope_fields(self, cfg) -> dict:
        """What cfg.json's ``metadata.headscope`` keeps to rebuild the training architecture."""
        return {"k": cfg.k} if self.uses_k else {}

    def fold_input_bias(self, w: dict) -> dict:
        """Loading an SAE that encodes x·W_enc + b_enc (SAELens' ``apply_b_dec_to_input = False``) into
        headscope's (x − b_dec)·W_enc + b_enc′: the changed tensors of ``w``, b_enc′ = b_enc + b_dec·W_enc."""
        return {"b_enc": w["b_enc"] + w["b_dec"] @ w["W_enc"]}

    # -- parameters ------------------------------------------------------------------------------
    def init_extra(self, sae, F: int) -> None:
        """Create the parameters / buffers beyond W_enc, b_enc, W_dec, b_dec on ``sae``."""

    def encoder_weight(self, sae) -> torch.Tensor:
        """The encoder [d_in, F] whose blocks are attributed to heads."""
        return sae.W_enc

    # -- the inference map -----------------------------------------------------------------------
    def pre_acts(self, sae, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations [N, F] of flat z ``x`` [N, d_in]."""
        return (x - sae.b_dec) @ sae.W_enc + sae.b_enc

    def activation(self, sae, pre: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        """Inference activations [N, F] from pre-activations (``x``: the flat input, for gates)."""
        return pre.relu()

    def forward(self, sae, x: torch.Tensor, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction [N, d_in], activations [N, F]) of flat ``x`` with pre-activations ``pre``."""
        acts = self.activation(sae, pre, x)
        return sae.decode(acts), acts

    # -- training --------------------------------------------------------------------------------
    def train_forward(self, sae, x: torch.Tensor, sparse: bool = True) -> TrainOutput:
        """The training map on a batch ``x`` [N, d_in]."""
        pre = sae.pre_acts(x)
        acts = pre.relu()
        return TrainOutput(sae.decode(acts), pre, acts=acts)

    def loss(self, sae, x: torch.Tensor, out: TrainOutput, mse: torch.Tensor, losses: dict, *, l1_coeff: float,
             dead: torch.Tensor | None, k_aux: int, aux_coeff: float, l0_coeff: float) -> dict:
        """Fill ``losses`` (``mse`` is in it) with this architecture's terms and ``loss``, the total."""
        raise HeadscopeError(f"SAE architecture '{self.name}' can be loaded but not trained here")

    @torch.no_grad()
    def after_step(self, sae, out: TrainOutput, threshold_lr: float) -> None:
        """Updates after each optimiser step, outside the optimiser."""


class AuxK(Architecture):
    """The k-sparse architectures (TopK, BatchTopK, Matryoshka): MSE + α·AuxK, the encoder starting as the
    decoder's transpose."""

    uses_k = True
    encoder_from_decoder = True

    def extra_losses(self, sae, x, out, losses: dict, total: torch.Tensor) -> torch.Tensor:
        """Terms added to the MSE before AuxK (Matryoshka's prefix reconstructions); returns the total."""
        return total

    def loss(self, sae, x, out, mse, losses, *, l1_coeff, dead, k_aux, aux_coeff, l0_coeff):
        total = self.extra_losses(sae, x, out, losses, mse)
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
                W_e = sae.W_enc[:, dead_idx]
                pre_d = torch.addmm(sae.b_enc[dead_idx] - sae.b_dec @ W_e, x, W_e)         # [N, n_dead]
                vals, j = pre_d.topk(ka, dim=-1, sorted=False)
                aux_rec = torch.zeros_like(pre_d).scatter(-1, j, vals.relu()) @ sae.W_dec[dead_idx]
            else:
                vals, j = out.pre[:, dead_idx].topk(ka, dim=-1, sorted=False)
                aux_rec = _SparseDecode.apply(vals.relu(), dead_idx[j], sae.W_dec)
            # as SAELens: scaled down while few features are dead
            aux = (aux_rec - target).pow(2).sum(-1).mean() * min(n_dead / k_aux, 1.0)
        losses["aux"] = aux
        losses["loss"] = total + aux_coeff * aux
        return losses
