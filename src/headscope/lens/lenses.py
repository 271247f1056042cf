"""Lens parameterizations for many heads at once: one :class:`LensBank` holds the lenses of K sites.

A *site* is one head (layer ℓ, head h); its input is the head result r_h = z_h · W_O[h] (no b_O), shape
[d] per token (see docs/design.md). A lens maps r_h to vocabulary logits [V]. Row-vector convention (x is a
row, so "A·r" of the issue is ``r @ A`` here). Every parameter has a leading lens axis [L, ...]; a
bank with ``shared="layer"`` has one lens per *layer* used by all heads of that layer, ``shared="all"``
one lens for every head of every chosen layer (the paper's question of one lens across layers).

A bank also holds **control lenses** (``controls``: source sites, one lens each, never shared): trained
and evaluated like the others on a head output scrambled across sequences and positions (see
sampling.py), they show what "no information" looks like. ``bank.sites`` are the real sites;
``bank.all_sites`` = sites + controls is what the statistics read (controls last).

Kinds (N = the model's final norm, optional with ``norm=True``; W_U [V, d], b_U [V] or 0):

* ``affine``:  logits = W_U · N(s·(r + r·A + b)) + b_U + c,  A [L,d,d], b [L,d], s [L] (learned
  scale, init 1), c [L,V] (vocabulary bias, optional). With A = b = 0, s = 1, c = 0 the lens equals the
  unembedding baseline (with or without the norm, as chosen).
* ``lowrank``: as affine with A = U·Vᵀ, U [L,d,r], Vᵀ [L,r,d] (U random, Vᵀ zero at init, so A = 0).
* ``full``:    logits = N(r)·W + β,  W [L,d,V] initialised to W_Uᵀ, β [L,V] to b_U (the paper's lens).

Models with final-logit soft-capping (Gemma-2: φ(x) = C·tanh(x/C)) get it where the model applies it,
before the learned biases: affine/lowrank φ(W_U·N(x) + b_U) + c, full φ(N(r)·W) + β; so step 0 still
equals the unembedding baseline φ(W_U·N(r)) (capped models have no b_U).

Lenses are saved as ``lenses.safetensors`` (parameters) + ``lenses.json`` (model identity incl. the
unembedding hash, site, sites, kind, training config); :func:`load_bank` refuses another model.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..errors import HeadscopeError
from ..models.load import Model
from ..runs import read_json, read_tensors, write_json, write_tensors
from .options import LensConfig

LENS_FORMAT = 2
"""2: statistics without position 0, null refitted on every token seen, control lenses."""
SITE = "result"


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The model's final-logit soft-capping C·tanh(x / C) (identity when ``cap`` is None)."""
    return logits if not cap else cap * torch.tanh(logits / cap)


class LensBank(nn.Module):
    """Lenses for K sites ``sites = [(layer, head), ...]``; forward maps r [K, N, d] → logits [K, N, V].

    ``W_U`` [V, d], ``b_U`` [V] and the final norm are frozen references to the model, not parameters.
    """

    def __init__(self, model: Model, sites: list[tuple[int, int]], cfg: LensConfig, seed: int = 0,
                 controls: list[tuple[int, int]] = ()):
        super().__init__()
        if not sites:
            raise HeadscopeError("no heads to build lenses for")
        self.cfg, self.sites = cfg, [tuple(s) for s in sites]
        self.control_sites = [tuple(s) for s in controls]
        self.all_sites = self.sites + self.control_sites
        self.model_ref = [model]  # not a submodule: never saved or trained
        self.lens_layers = sorted({l for l, _ in self.sites}) if cfg.shared == "layer" else None
        if cfg.shared == "layer":
            idx = [self.lens_layers.index(l) for l, _ in self.sites]
        elif cfg.shared == "all":
            idx = [0] * len(self.sites)
        else:
            idx = list(range(len(self.sites)))
        n_real = max(idx) + 1
        idx += [n_real + i for i in range(len(self.control_sites))]
        L = len(set(idx))
        self.n_real_lenses = n_real
        self.register_buffer("lens_index", torch.tensor(idx, dtype=torch.long), persistent=False)
        d, V = model.d_model, model.d_vocab
        W_U = model.W_U.detach().float().cpu()
        b_U = model.b_U.detach().float().cpu() if model.b_U is not None else torch.zeros(V)
        g = torch.Generator().manual_seed(seed)
        if cfg.kind == "full":
            self.W = nn.Parameter(W_U.T.unsqueeze(0).repeat(L, 1, 1).contiguous())
            self.beta = nn.Parameter(b_U.unsqueeze(0).repeat(L, 1).contiguous())
        else:
            if cfg.kind == "affine":
                self.A = nn.Parameter(torch.zeros(L, d, d))
            else:
                self.U = nn.Parameter(torch.randn(L, d, cfg.rank, generator=g) / math.sqrt(d))
                self.Vt = nn.Parameter(torch.zeros(L, cfg.rank, d))
            self.b = nn.Parameter(torch.zeros(L, d))
            self.log_s = nn.Parameter(torch.zeros(L))
            if cfg.vocab_bias:
                self.c = nn.Parameter(torch.zeros(L, V))
        self.n_lenses = L

    # -- model pieces --------------------------------------------------------------------------
    @property
    def model(self) -> Model:
        return self.model_ref[0]

    def unembed(self, dtype=torch.float32):
        m = self.model
        W_U = m.W_U.detach().to(dtype)
        b_U = m.b_U.detach().to(dtype) if m.b_U is not None else None
        return W_U, b_U

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The model's final norm N(x), computed in the model's dtype, returned in x's dtype."""
        return self.model.final_norm(x.to(self.model.dtype)).to(x.dtype)

    def n_params_per_lens(self) -> int:
        return sum(p[0].numel() for p in self.parameters())

    # -- forward -------------------------------------------------------------------------------
    def _rows(self, r: torch.Tensor, lenses: torch.Tensor | None) -> torch.Tensor | None:
        """The lens of each row of r [K, N, d]: ``lenses``, or each site's own (sites, then controls);
        None when row k simply uses lens k (no gather needed)."""
        if lenses is not None:
            return lenses
        K = r.shape[0]
        if K > len(self.lens_index):
            raise HeadscopeError(f"{K} rows of head outputs for a bank of {len(self.lens_index)} sites")
        if self.cfg.shared == "none" and K == self.n_lenses:
            return None
        return self.lens_index[:K]

    def _p(self, name: str, lenses: torch.Tensor | None):
        p = getattr(self, name)
        return p if lenses is None else p[lenses]

    def transform(self, r: torch.Tensor, lenses: torch.Tensor | None = None) -> torch.Tensor:
        """Affine/lowrank: the residual-space vector s·(r + r·A + b) [K, N, d] (before the norm)."""
        lenses = self._rows(r, lenses)
        if self.cfg.kind == "affine":
            x = r + torch.bmm(r, self._p("A", lenses))
        else:
            x = r + torch.bmm(torch.bmm(r, self._p("U", lenses)), self._p("Vt", lenses))
        x = x + self._p("b", lenses)[:, None, :]
        return x * self._p("log_s", lenses).exp()[:, None, None]

    def forward(self, r: torch.Tensor, lenses: torch.Tensor | None = None,
                vocab: torch.Tensor | None = None, compute_dtype=torch.float32) -> torch.Tensor:
        """Logits [K, N, V] (or [K, N, |vocab|] for a token subset ``vocab``) from head results
        r [K, N, d]. ``lenses`` [K] picks which lens reads each row (default: each site's own),
        which is how transfer matrices apply one head's lens to another head's output."""
        r = r.float()
        lenses = self._rows(r, lenses)
        if self.cfg.kind == "full":
            x = self.norm(r) if self.cfg.norm else r
            W, beta = self._p("W", lenses), self._p("beta", lenses)
            if vocab is not None:
                W, beta = W[:, :, vocab], beta[:, vocab]
            pre = torch.bmm(x.to(compute_dtype), W.to(compute_dtype)).float()
            return softcap(pre, self.model.logit_softcap) + beta[:, None, :]
        x = self.transform(r, lenses)
        if self.cfg.norm:
            x = self.norm(x)
        W_U, b_U = self.unembed(compute_dtype)
        if vocab is not None:
            W_U = W_U[vocab]
            b_U = b_U[vocab] if b_U is not None else None
        logits = torch.matmul(x.to(compute_dtype), W_U.T).float()
        if b_U is not None:
            logits = logits + b_U.float()
        logits = softcap(logits, self.model.logit_softcap)
        if self.cfg.vocab_bias:
            c = self._p("c", lenses)
            logits = logits + (c[:, vocab] if vocab is not None else c)[:, None, :]
        return logits

    # -- the same map on z -------------------------------------------------------------------------
    def reads_z(self) -> bool:
        """Whether each lens' logits are affine in its head's z (affine/lowrank lenses without the norm):
        r_h = z_h·W_O[h], so the lens is z ↦ z·Bz + e with Bz of rank Dh (:meth:`z_maps`), and a logit
        costs Dh instead of d multiply-adds."""
        return self.cfg.kind != "full" and not self.cfg.norm

    def site_W_O(self, rows: list[int]) -> torch.Tensor:
        """W_O of the heads of site rows ``rows`` (indices into ``all_sites``): [k, Dh, d] float32."""
        return torch.stack([self.model.W_O(l)[h] for l, h in (self.all_sites[i] for i in rows)]).float()

    @torch.no_grad()
    def z_maps(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """For site rows ``rows`` (indices into ``all_sites``, each read by its own lens): Bz [k, Dh, V] and
        e [k, V] with ``transform(z·W_O[h])·W_Uᵀ = z·Bz + e``, i.e. Bz = s·W_O[h]·(I + A)·W_Uᵀ, e = s·b·W_Uᵀ."""
        m = self.model
        W_U = m.W_U.detach().float()
        lenses = self.lens_index[rows]
        W_O = self.site_W_O(rows).to(W_U.device)
        if self.cfg.kind == "affine":
            WA = W_O + torch.bmm(W_O, self.A[lenses])                              # [k, Dh, d]
        else:
            WA = W_O + torch.bmm(torch.bmm(W_O, self.U[lenses]), self.Vt[lenses])
        s = self.log_s[lenses].exp()
        return (WA @ W_U.T) * s[:, None, None], (self.b[lenses] @ W_U.T) * s[:, None]

    def logits_from_z(self, z: torch.Tensor, maps: tuple[torch.Tensor, torch.Tensor], rows: list[int]) -> torch.Tensor:
        """Logits [k, n, V] of the lenses of site rows ``rows`` from their heads' z [k, n, Dh] and
        ``maps = z_maps(rows)``: equal to ``forward(z·W_O)`` (tested)."""
        Bz, e = maps
        logits = torch.baddbmm(e.unsqueeze(1), z.float(), Bz)
        if self.model.b_U is not None:
            logits += self.model.b_U.detach().float()
        logits = softcap(logits, self.model.logit_softcap)
        if self.cfg.vocab_bias:
            logits += self.c[self.lens_index[rows]][:, None, :]
        return logits

    # -- per-lens operations (used by training) ---------------------------------------------------
    def per_lens_grad_norm(self) -> torch.Tensor:
        """‖grad‖ of each lens [L] (all parameters have a leading lens axis)."""
        sq = None
        for p in self.parameters():
            if p.grad is None:
                continue
            s = p.grad.float().pow(2).reshape(p.shape[0], -1).sum(1)
            sq = s if sq is None else sq + s
        return sq.sqrt() if sq is not None else torch.zeros(self.n_lenses)

    def clip_per_lens(self, max_norm: float) -> torch.Tensor:
        """Clip each lens' gradient to ``max_norm`` independently (heads do not share a budget)."""
        norms = self.per_lens_grad_norm()
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(scale.view(-1, *([1] * (p.dim() - 1))).to(p.grad.dtype))
        return norms

    def direction(self, site_index: int, token: int) -> torch.Tensor:
        """A residual-space direction [d] this lens reads as ``token``: the head-output vector x with
        lens(x) maximally raising ``token`` (affine/lowrank: (I + A)·s applied backwards, i.e. the
        gradient of the token's logit w.r.t. r at r = 0, ignoring the norm)."""
        W_U = self.model.W_U.detach().float()[token]
        li = int(self.lens_index[site_index])
        with torch.no_grad():
            if self.cfg.kind == "full":
                return self.W[li, :, token].detach().clone()
            if self.cfg.kind == "affine":
                M = torch.eye(W_U.numel()) + self.A[li]
            else:
                M = torch.eye(W_U.numel()) + self.U[li] @ self.Vt[li]
            return (M @ W_U) * self.log_s[li].exp()


# ---------------------------------------------------------------------------------------------------
def bank_info(bank: LensBank, train_cfg: dict | None = None) -> dict:
    m = bank.model
    return {"format": LENS_FORMAT, "model": m.identity(), "site": SITE, "sites": [list(s) for s in bank.sites],
            "controls": [list(s) for s in bank.control_sites], "lens": asdict(bank.cfg), "train": train_cfg or {}}


def save_bank(bank: LensBank, folder: Path, train_cfg: dict | None = None) -> None:
    """Write ``folder/lenses.safetensors`` and ``folder/lenses.json`` atomically."""
    folder = Path(folder)
    write_tensors(folder / "lenses.safetensors", {k: v for k, v in bank.state_dict().items()})
    write_json(folder / "lenses.json", bank_info(bank, train_cfg))


def load_bank(model: Model, folder: Path, allow_other_checkpoint: bool = False) -> tuple[LensBank, dict]:
    """Load lenses from ``folder`` (a lens folder or a run directory). Refuses lenses made for another
    model; ``allow_other_checkpoint`` accepts a different unembedding (same shapes): the checkpoint-transfer
    question."""
    folder = Path(folder)
    if not (folder / "lenses.json").exists() and (folder / "lens" / "lenses.json").exists():
        folder = folder / "lens"
    info = read_json(folder / "lenses.json")
    if not isinstance(info, dict) or info.get("format") != LENS_FORMAT:
        raise HeadscopeError(f"lens file {folder / 'lenses.json'} has format {info.get('format') if isinstance(info, dict) else '?'}, "
                             f"this headscope reads format {LENS_FORMAT}: retrain the lenses")
    saved = dict(info.get("model", {}))
    if allow_other_checkpoint:
        saved.pop("unembed_sha1", None)
    model.check_identity(saved, what=f"lens {folder}")
    try:
        cfg = LensConfig(**info["lens"])
        sites = [tuple(s) for s in info["sites"]]
        controls = [tuple(s) for s in info.get("controls", [])]
    except (KeyError, TypeError) as e:
        raise HeadscopeError(f"corrupt lens file {folder / 'lenses.json'}: {e}") from None
    for l, h in sites + controls:
        model.check_layer(l), model.check_head(h)
    bank = LensBank(model, sites, cfg, controls=controls)
    state = read_tensors(folder / "lenses.safetensors")
    try:
        bank.load_state_dict(state)
    except RuntimeError as e:
        raise HeadscopeError(f"lens parameters in {folder} do not match lenses.json: {str(e).splitlines()[0]}") from None
    return bank.to(model.device), info
