"""Head roles read from the weights: the OV-circuit copying score and the succession score.

Shapes: V vocabulary, d model dim, H query heads, Dh head dim, L layers.

* **Folded norms.** A head reads N_l(x) = γ_l ⊙ x̂ (+ β_l), x̂ the normalised residual, and its output reaches
  the logits through the final norm: logits = W_U · (γ_f ⊙ P·r) / σ, P the centring of a LayerNorm (identity
  for RMSNorm), σ > 0 the final scale. W_U is centred over the vocabulary (W_Uc = W_U − mean_v W_U), which
  also removes β_l exactly (Σ_v W_Uc[v] = 0). A Gemma-style post-attention norm's gain is folded into W_O.
* **Copying score** (Elhage et al. 2021): the eigenvalues λ of the full OV circuit
  M_h = x̂(W_E)·diag(γ_l)·W_V^h·W_O^h·P·diag(γ_f)·W_Ucᵀ [V, V] summarised as Σ Re λ / Σ |λ| ∈ [−1, 1]
  (+1: every direction copied; −1: every direction suppressed). M_h and the cyclic product
  W_O^h·K_l·W_V^h [Dh, Dh], K_l = P·diag(γ_f)·W_Ucᵀ·x̂(W_E)·diag(γ_l) [d, d], share their nonzero
  eigenvalues, so no V×V matrix is formed. σ and the positive scale of x̂ leave the ratio unchanged.
* **Succession score** (Gould et al. 2023): over ordinal token sets (numbers, number words, ordinals, days,
  months, letters; single tokens with a leading space), the head's OV image of the effective embedding
  W_EE = W_E + MLP0(N(W_E)) read through the folded unembedding; the score is the fraction of tokens t whose
  successor has the highest logit among the tokens of t's set (argmax within the set, as the paper does).
"""

from __future__ import annotations

import torch

from ..models.load import Model, _weight_in_out

NUMBER_WORDS = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                "sixteen seventeen eighteen nineteen twenty").split()
ORDINAL_TASKS: dict[str, tuple[list[str], bool]] = {
    "numbers": ([str(i) for i in range(1, 201)], False),
    "number words": (NUMBER_WORDS, False),
    "ordinals": ("first second third fourth fifth sixth seventh eighth ninth tenth".split(), False),
    "days": ("Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split(), True),
    "days short": ("Mon Tue Wed Thu Fri Sat Sun".split(), True),
    "months": ("January February March April May June July August September October November December".split(),
               True),
    "months short": ("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), True),
    "letters": ([chr(c) for c in range(ord("A"), ord("Z") + 1)], False),
}
"""Task name → (items in order, cyclic). Items are read with a leading space."""


def W_E(model: Model) -> torch.Tensor:
    """Token embedding, [V, d]."""
    return model.hf.get_input_embeddings().weight


def W_V(model: Model, layer: int) -> torch.Tensor:
    """Per-query-head value weights, [H, d, Dh] (GQA: head h reads its KV group's weights)."""
    H, Hkv, Dh = model.n_heads, model.n_kv_heads, model.d_head
    w = _weight_in_out(model.block_module(layer, model.arch.v_proj))  # [d, out]
    d = w.shape[0]
    layout = model.arch.qkv
    if layout == "separate":
        wv = w.reshape(d, Hkv, Dh)
    elif layout == "split3":
        wv = w[:, 2 * H * Dh:].reshape(d, H, Dh)
    else:  # neox: [d, H, 3, Dh]
        wv = w.reshape(d, H, 3, Dh)[:, :, 2]
    wv = wv.permute(1, 0, 2)  # [H_kv, d, Dh]
    return wv[[model.kv_group(h) for h in range(H)]] if wv.shape[0] != H else wv


def W_O_folded(model: Model, layer: int) -> torch.Tensor:
    """W_O [H, Dh, d] with a post-attention norm's gain folded in (Gemma-2/3), else W_O."""
    wo = model.W_O(layer)
    if model.arch.post_attn_norm:
        wo = wo * model.norm_gain(model.block_module(layer, model.arch.post_attn_norm))
    return wo


def normalised(model: Model, x: torch.Tensor) -> torch.Tensor:
    """x̂ [..., d]: centred (LayerNorm) and divided by its RMS — the norm without its gain and bias."""
    x = x.float()
    if model.arch.norm_kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


def readout(model: Model) -> torch.Tensor:
    """P·diag(γ_f)·W_Ucᵀ, [d, V]: a residual-space vector → centred logits (up to the final scale 1/σ)."""
    wu = model.W_U.float()
    wuc = wu - wu.mean(0, keepdim=True)
    B = model.norm_gain(model.final_norm).float()[:, None] * wuc.T  # [d, V]
    if model.arch.norm_kind == "layernorm":
        B = B - B.mean(0, keepdim=True)
    return B


@torch.no_grad()
def copying_kernels(model: Model) -> torch.Tensor:
    """K_l = P·diag(γ_f)·W_Ucᵀ·x̂(W_E)·diag(γ_l) for every layer, [L, d, d] (one V-sized product in all)."""
    G = readout(model) @ normalised(model, W_E(model))  # [d, d]
    return torch.stack([G * model.norm_gain(model.block_module(l, model.arch.ln_attn)).float()[None, :]
                        for l in range(model.n_layers)])


def eig_ratio(M: torch.Tensor) -> torch.Tensor:
    """Σ Re λ / Σ |λ| of each square matrix of M [..., n, n] (fp32 eig), [...]."""
    lam = torch.linalg.eigvals(M.float())
    return lam.real.sum(-1) / lam.abs().sum(-1).clamp_min(1e-30)


@torch.no_grad()
def copying_scores(model: Model, null_draws: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """OV copying score of every head [L, H], and the same score of ``null_draws`` random OV circuits per layer
    [L, null_draws] (W_V, W_O Gaussian of the head's shape, read through the layer's own K_l)."""
    K = copying_kernels(model)
    L, H, Dh, d = model.n_layers, model.n_heads, model.d_head, model.d_model
    scores = torch.zeros(L, H)
    null = torch.zeros(L, null_draws)
    g = torch.Generator().manual_seed(seed)
    for l in range(L):
        wv, wo = W_V(model, l).float(), W_O_folded(model, l).float()  # [H, d, Dh], [H, Dh, d]
        scores[l] = eig_ratio(wo @ K[l] @ wv)
        if null_draws:
            rv = torch.randn(null_draws, d, Dh, generator=g)
            ro = torch.randn(null_draws, Dh, d, generator=g)
            null[l] = eig_ratio(ro @ K[l] @ rv)
    return scores, null


def ordinal_tasks(model: Model) -> list[tuple[str, list[int], bool]]:
    """The ordinal sets this tokenizer spells as single tokens (with a leading space): (name, ids, cyclic),
    sets of fewer than 3 single-token items left out; a multi-token item is dropped from its set (its
    neighbours are then not successors of each other: see :func:`successor_pairs`)."""
    out = []
    for name, (items, cyclic) in ORDINAL_TASKS.items():
        ids = []
        for it in items:
            t = model.tokenizer(" " + it, add_special_tokens=False)["input_ids"]
            ids.append(t[0] if len(t) == 1 else None)
        if sum(i is not None for i in ids) >= 3:
            out.append((name, ids, cyclic))
    return out


def successor_pairs(ids: list[int | None], cyclic: bool) -> list[tuple[int, int]]:
    """(index of t, index of succ(t)) within ``ids`` for the items whose successor is a single token too."""
    n = len(ids)
    pairs = []
    for i in range(n if cyclic else n - 1):
        j = (i + 1) % n
        if ids[i] is not None and ids[j] is not None:
            pairs.append((i, j))
    return pairs


@torch.no_grad()
def effective_embedding(model: Model, ids: torch.Tensor) -> torch.Tensor:
    """W_EE[ids] = W_E[ids] + MLP0(N_mlp0(W_E[ids])) (layer-0 attention skipped), [n, d]."""
    e = W_E(model)[ids].to(model.dtype)
    ln = model.block_module(0, model.arch.ln_mlp)
    mlp = model.block_module(0, model.arch.mlp)
    return (e + mlp(ln(e[None]))[0]).float()


@torch.no_grad()
def successor_hits(model: Model, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Per (task token t, head): whether succ(t) has the highest OV logit among t's set, [n, L, H] (bool), and
    the same for a random other item of the set instead of succ(t) (the control), [n, L, H]; and the task
    of each row. n = 0 when the tokenizer spells no ordinal set as single tokens."""
    g = torch.Generator().manual_seed(seed)
    L, H = model.n_layers, model.n_heads
    hits, ctrl, names = [], [], []
    B = readout(model)
    for name, ids, cyclic in ordinal_tasks(model):
        pairs = successor_pairs(ids, cyclic)
        if not pairs:
            continue
        keep = [i for i, t in enumerate(ids) if t is not None]
        col = {i: k for k, i in enumerate(keep)}
        tok = torch.tensor([ids[i] for i in keep])
        src = torch.tensor([col[i] for i, _ in pairs])
        dst = torch.tensor([col[j] for _, j in pairs])
        # control target: a uniformly random item of the set other than t and succ(t)
        other = []
        for s, t in zip(src.tolist(), dst.tolist()):
            rest = [k for k in range(len(keep)) if k not in (s, t)] or [t]
            other.append(rest[int(torch.randint(len(rest), (1,), generator=g))])
        other = torch.tensor(other)
        ee = effective_embedding(model, tok)  # [k, d]
        Bt = B[:, tok]  # [d, k]
        h = torch.zeros(len(pairs), L, H, dtype=torch.bool)
        c = torch.zeros(len(pairs), L, H, dtype=torch.bool)
        for l in range(L):
            x = model.block_module(l, model.arch.ln_attn)(ee[src].to(model.dtype)[None])[0].float()  # [n, d]
            o = torch.einsum("nd,hde,hef->nhf", x, W_V(model, l).float(), W_O_folded(model, l).float())
            best = (o @ Bt).argmax(-1)  # [n, H]
            h[:, l] = best == dst[:, None]
            c[:, l] = best == other[:, None]
        hits.append(h)
        ctrl.append(c)
        names += [name] * len(pairs)
    if not hits:
        return torch.zeros(0, L, H, dtype=torch.bool), torch.zeros(0, L, H, dtype=torch.bool), []
    return torch.cat(hits), torch.cat(ctrl), names

