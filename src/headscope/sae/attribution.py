"""Attributing SAE features to heads and to source tokens.

* **Weight attribution** (the paper's): ``w[f, h] = ‖W_dec[f, h-block]‖ / Σ_h′ ‖W_dec[f, h′-block]‖``,
  [F, H]; rows sum to 1.
* **Per-head top features and polysemanticity** (:func:`head_features`): a head's top features are
  the live features with the largest ``w[f, h]``. Two of them are *related* when the cosine of their
  decoder blocks for that head, ``W_dec[f, h] · W_dec[f′, h]`` (normalised, in the head's Dh-space), is
  ≥ ``cos_threshold`` (0.3; random directions in Dh = 64 have σ ≈ 0.125) **or** their top-10 output
  tokens through that head (``W_dec[f, h] · W_O[h] · diag(γ_final) · W_Uᵀ``) share ≥ ``token_jaccard``
  (0.2) Jaccard overlap. The head's *feature groups* are the connected components of that relation;
  ``n_groups`` is the polysemanticity estimate and a head with ≥ 2 groups is called polysemantic.
  This replaces the paper's manual judgement with a measurable rule.
* **Direct feature attribution** (:func:`dfa`): ``DFA_f[t, s, h] = pattern_h[t, s] · (v_{g(h)}[s] ·
  W_enc[h-block, f])`` with g(h) = h // (H/H_kv) (GQA). Σ_{s,h} DFA_f[t] = z[t] · W_enc[:, f] exactly
  (z_h[t] = Σ_s pattern_h[t, s] v_{g(h)}[s]); left out of the pre-activation: the constant
  b_enc[f] − b_dec · W_enc[:, f] (no source), and the nonlinearity (ReLU/TopK) itself.
* **Recursive DFA** (:func:`recursive_dfa`), one step upstream: v[s] = W_V·N(x_s) + b_V is linear in the
  residual x_s = Σ_c c_s once the norm's scale 1/σ_s is frozen (and, for LayerNorm, its centring, which
  is linear), so each upstream component c (embeddings, every earlier head's result, each earlier
  b_O and MLP output) gets ``Σ_h pattern_h[t, s] · (W_V γ ⊙ centre(c_s) / σ_s)_{g(h)} · W_enc[h, f]``
  with attention patterns frozen too; the norm/value biases form one more term (``v_bias``), so the
  components sum exactly to the DFA. Architectures with a norm after attention (Gemma-2) are refused:
  there a head's result is not what reaches the residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import _values, capture
from ..errors import HeadscopeError
from ..models.load import Model
from .model import AttnSAE


def weight_attribution(sae: AttnSAE) -> torch.Tensor:
    """[F, H]: share of each head in each feature's decoder norm (rows sum to 1)."""
    n = sae.head_blocks("dec").detach().norm(dim=-1)
    return n / n.sum(-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def output_tokens(model: Model, sae: AttnSAE, features: list[int], head: int | None = None, k: int = 10) -> dict:
    """Top and bottom tokens of each feature's direct effect on the logits: W_dec[f] (or one head's
    block) through W_O, the final norm's gain γ and W_U. Returns {f: {"top": [(tok, val)], "bottom": …}}."""
    if not features:
        return {}
    L = sae.cfg.layer
    W_O = model.W_O(L).detach().float().cpu()                                  # [H, Dh, d]
    dec = sae.head_blocks("dec").detach().float().cpu()[features]              # [n, H, Dh]
    if head is None:
        resid = torch.einsum("nhk,hkd->nd", dec, W_O)
    else:
        resid = dec[:, head] @ W_O[head]
    resid = resid * model.norm_gain(model.final_norm).detach().float().cpu()
    logits = resid @ model.W_U.detach().float().cpu().T                        # [n, V]
    top = logits.topk(k, dim=1)
    bot = logits.topk(k, dim=1, largest=False)
    ids = sorted(set(top.indices.flatten().tolist()) | set(bot.indices.flatten().tolist()))
    tok = dict(zip(ids, model.token_str(ids)))
    tv, ti, bv, bi = top.values.tolist(), top.indices.tolist(), bot.values.tolist(), bot.indices.tolist()
    out = {}
    for i, f in enumerate(features):
        out[f] = {"top": [[tok[t], round(v, 4)] for v, t in zip(tv[i], ti[i])],
                  "bottom": [[tok[t], round(v, 4)] for v, t in zip(bv[i], bi[i])],
                  "top_ids": ti[i]}
    return out


@torch.no_grad()
def head_features(model: Model, sae: AttnSAE, alive: torch.Tensor | None = None, top_n: int = 10,
                  cos_threshold: float = 0.3, token_jaccard: float = 0.2) -> dict[int, dict]:
    """Per head: its top ``top_n`` live features by weight attribution, and the polysemanticity
    estimate (see module docstring). ``alive``: bool [F] (features that fire), default all."""
    w = weight_attribution(sae).cpu()
    F, H = w.shape
    alive = torch.ones(F, dtype=torch.bool) if alive is None else alive.cpu().bool()
    dec = sae.head_blocks("dec").detach().float().cpu()
    out = {}
    for h in range(H):
        score = w[:, h].masked_fill(~alive, -1.0)
        n = min(top_n, int(alive.sum()))
        top = score.topk(n).indices.tolist() if n > 0 else []
        top = [f for f in top if score[f] > 0]
        blocks = dec[top, h]
        blocks = blocks / blocks.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cos = blocks @ blocks.T if top else torch.zeros(0, 0)
        toks = output_tokens(model, sae, top, head=h)
        sets = [set(toks[f]["top_ids"]) for f in top]
        parent = list(range(len(top)))

        def find(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i
        for i in range(len(top)):
            for j in range(i + 1, len(top)):
                jac = len(sets[i] & sets[j]) / max(1, len(sets[i] | sets[j]))
                if cos[i, j] >= cos_threshold or jac >= token_jaccard:
                    parent[find(i)] = find(j)
        groups: dict[int, list[int]] = {}
        for i, f in enumerate(top):
            groups.setdefault(find(i), []).append(f)
        out[h] = {
            "top_features": [{"feature": f, "attribution": round(float(w[f, h]), 4),
                              "top_tokens": [t for t, _ in toks[f]["top"][:5]]} for f in top],
            "groups": sorted(groups.values(), key=len, reverse=True),
            "n_groups": len(groups),
            "polysemantic": len(groups) >= 2,
            "n_features_majority": int(((w[:, h] > 0.5) & alive).sum()),
        }
    return out


@torch.no_grad()
def dfa_inputs(model: Model, sae: AttnSAE, ids: torch.Tensor, features: list[int] | None = None):
    """(pattern [B, H, S, S], proj [B, S, H, F′]) with proj[b, s, h, f] = v_{g(h)}[s] · W_enc[h-block, f];
    DFA_f[t, s, h] = pattern[b, h, t, s] · proj[b, s, h, f]."""
    L = sae.cfg.layer
    cap = capture(model, ids.to(model.device), layers=[L], what=("pattern", "v"), stop_after=L)
    return dfa_from_capture(model, sae, cap["pattern"][L], cap["v"][L], features)


def dfa_from_capture(model: Model, sae: AttnSAE, pattern: torch.Tensor, v: torch.Tensor,
                     features: list[int] | None = None):
    """:func:`dfa_inputs` from an already captured pattern [B, H, S, S] and v [B, S, Hkv, Dh] of the
    SAE's layer."""
    H = model.n_heads
    pat = pattern.float()                                                      # [B, H, S, S]
    v = v.float()                                                              # [B, S, Hkv, Dh]
    groups = torch.tensor([model.kv_group(h) for h in range(H)], device=v.device)
    vq = v[:, :, groups]                                                       # [B, S, H, Dh]
    W = sae.head_blocks("enc").detach().float().to(v.device)                  # [H, Dh, F]
    if features is not None:
        W = W[..., list(features)]
    return pat, torch.einsum("bshd,hdf->bshf", vq, W)


@torch.no_grad()
def dfa(model: Model, sae: AttnSAE, ids: torch.Tensor, features: list[int] | None = None,
        dest: int | None = None) -> torch.Tensor:
    """Direct feature attribution for token ids [B, S]: [B, T, S, H, F′] with T = S (or 1 when
    ``dest`` is given) and F′ the chosen ``features`` (default all). Exact for the linear part of the
    pre-activation: ``dfa(...).sum((2, 3)) == z[:, t] · W_enc[:, f]``."""
    pat, proj = dfa_inputs(model, sae, ids, features)
    if dest is not None:
        if not -pat.shape[-1] <= dest < pat.shape[-1]:
            raise HeadscopeError(f"destination position {dest} is out of range for {pat.shape[-1]} tokens")
        pat = pat[:, :, [dest]]
    return torch.einsum("bhts,bshf->btshf", pat, proj)


@dataclass
class RDFA:
    """One step of recursive DFA for one destination token and feature of one sequence.

    ``names``: component names (``embed``, ``L{l}H{h}``, ``L{l}.b_O``, ``L{l}.mlp``, ``v_bias``);
    ``values``: [C, S] contribution of each component at each source position; their sum over C equals
    ``dfa[t, s].sum(heads)``."""

    names: list[str]
    values: torch.Tensor

    def top(self, k: int = 10) -> list[tuple[str, int, float]]:
        """The ``k`` largest |contributions| as (component, source position, value)."""
        flat = self.values.flatten()
        idx = flat.abs().topk(min(k, flat.numel())).indices
        S = self.values.shape[1]
        return [(self.names[int(i) // S], int(i) % S, float(flat[i])) for i in idx]


def _norm_scale(model: Model, norm, x: torch.Tensor) -> torch.Tensor:
    """1/σ of the pre-attention norm at each position of x [S, d] → [S, 1] (frozen in RDFA)."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or 1e-5
    if model.arch.norm_kind == "layernorm":
        var = x.var(-1, unbiased=False, keepdim=True)
    else:
        var = x.pow(2).mean(-1, keepdim=True)
    return torch.rsqrt(var + eps)


@torch.no_grad()
def recursive_dfa(model: Model, sae: AttnSAE, ids: torch.Tensor, dest: int, feature: int) -> RDFA:
    """Recursive DFA one step upstream for sequence ``ids`` [S] (or [1, S]) at position ``dest``."""
    if model.arch.post_attn_norm:
        raise HeadscopeError(f"recursive DFA is not supported for {model.arch.family}: its post-attention norm "
                             "makes a head's result differ from what reaches the residual stream")
    ids = ids.reshape(1, -1).to(model.device)
    S = ids.shape[1]
    if not 0 <= dest < S:
        raise HeadscopeError(f"destination position {dest} is out of range for {S} tokens")
    if not 0 <= feature < sae.cfg.d_sae:
        raise HeadscopeError(f"feature {feature} is out of range: the SAE has features 0..{sae.cfg.d_sae - 1}")
    L, H = sae.cfg.layer, model.n_heads
    layers = list(range(L + 1))
    cap = capture(model, ids, layers=layers, what=("resid_pre", "resid_post", "attn_out", "result", "pattern"),
                  stop_after=L)
    comps: list[tuple[str, torch.Tensor]] = [("embed", cap["resid_pre"][0][0])]
    for l in range(L):
        for h in range(H):
            comps.append((f"L{l}H{h}", cap["result"][l][0, :, h]))
        b = model.b_O(l)
        if b is not None:
            comps.append((f"L{l}.b_O", b.detach().expand(S, -1)))
        comps.append((f"L{l}.mlp", cap["resid_post"][l][0] - cap["resid_pre"][l][0] - cap["attn_out"][l][0]))
    x = cap["resid_pre"][L][0].float()
    norm = model.block_module(L, model.arch.ln_attn)
    inv_sigma = _norm_scale(model, norm, x)
    gamma = model.norm_gain(norm).detach().float()
    beta = getattr(norm, "bias", None)
    v_proj = model.block_module(L, model.arch.v_proj)
    pdtype = next(v_proj.parameters()).dtype

    def vals(n: torch.Tensor) -> torch.Tensor:                                # [S, d] → [S, Hkv, Dh]
        return _values(model, v_proj(n.to(pdtype)[None]))[0].float()
    zero_v = vals(torch.zeros_like(x))
    groups = [model.kv_group(h) for h in range(H)]
    W = sae.head_blocks("enc").detach().float()[..., feature].to(x.device)    # [H, Dh]
    pat = cap["pattern"][L][0, :, dest].float()                                # [H, S]

    def score(v: torch.Tensor) -> torch.Tensor:                                # [S, Hkv, Dh] → [S]
        proj = (v[:, groups] * W).sum(-1)                                      # [S, H]
        return (proj * pat.T).sum(-1)
    names, rows = [], []
    for name, c in comps:
        c = c.float()
        if model.arch.norm_kind == "layernorm":
            c = c - c.mean(-1, keepdim=True)
        rows.append(score(vals(gamma * c * inv_sigma) - zero_v))
        names.append(name)
    bias_in = beta.detach().float().expand(S, -1) if beta is not None else torch.zeros_like(x)
    rows.append(score(vals(bias_in)))
    names.append("v_bias")
    return RDFA(names, torch.stack(rows))
