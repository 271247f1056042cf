"""Per-head view of an SAE, a polysemanticity test calibrated against a null, and that test's power:
``run_analysis(model, run, AnalysisOptions(name=…)) -> SAEAnalysisResult`` (the ``sae.analysis`` stage).

Writes ``sae/<name>/attribution.safetensors`` (key ``weight_attribution`` [F, H]) and
``sae/<name>/heads.json``. Features that never fired during ``sae eval`` (``feature_counts.safetensors``)
are left out when that file exists.

**Top features of head h**: the ``top_n`` (10) live features with the largest weight attribution
``w[f, h]`` (:func:`headscope.sae.attribution.weight_attribution`).

**Related features.** For two of them, their decoder blocks for head h (``W_dec[f, h]`` in the head's
Dh space) have a cosine, and their top-``top_tokens`` output tokens through that head
(``W_dec[f, h] · W_O[h] · diag(γ_final) · W_Uᵀ``) a Jaccard overlap. Neither has a meaningful fixed
threshold (random 64-d directions almost never reach cos 0.3, while high-norm unembeddings make random
directions share top tokens), so both are calibrated: a pair is *related* when its cosine or its
Jaccard is as large as at most ``pair_alpha / 2`` (0.5 %) of the pairs of the null features of the
same head (pooled over both nulls below). The head's *groups* are the connected components of the
relation with ≥ 2 features; k1 ≥ k2 are the sizes of the two largest (0 if absent).

**Nulls** (``n_null`` draws each, per head, with the same top-n selection):

* ``untrained``: a shape-matched untrained SAE (``type(sae)(sae.cfg, seed=…)``): random decoders.
* ``permuted``: the real decoder with each feature's H head blocks permuted at random (the head a
  block belongs to is shuffled, the blocks themselves are the real ones), so a head's "top features"
  are real blocks from unrelated heads.

Only pairs of blocks from different source heads carry the null's meaning: two blocks of one source
head h′ keep h′'s own structure — what the test looks for — so they neither calibrate the pair relation
nor count in the permuted null's groups: in each permuted draw a same-source pair is *not related*
(the untrained null has no such pairs). Counting them (as the test once did) let a head h′ with real
groups inflate every other head's null k1/k2 and hide real groups. The alternative, permutations that
never put two blocks of one source head into one head's top set, does not exist whenever ``top_n`` > H
(SmolLM2: 10 > 9 heads). The price: a permuted draw's graph has about 1/H fewer candidate pairs than the
real head's, lowering its k slightly; the test takes the larger p of the two nulls, and the untrained
null has every pair, so the test is never looser than against the untrained null alone.

**Test.** A head is *polysemantic* when it has at least two groups, more than the null has:
p = max over the two nulls of (1 + #{null draws with k2 ≥ k2_obs}) / (1 + n_null) (1 when k2_obs < 2),
Benjamini–Hochberg over the heads (``scipy.stats.false_discovery_control``) at ``q`` = 0.05. The same
with k1 tests for *any* structure: a head with significant k1 but not k2 is ``one group``; a head with
neither is ``no structure beyond the null`` — which is what a head whose features point in unrelated
directions (e.g. an induction head copying different tokens) looks like: this criterion cannot call it
either way. ``null_polysemantic_frac`` is the rate at which the same test, applied to each null draw
against the other draws, calls a head polysemantic (the negative control; ≈ 0 by construction), and
``uncalibrated`` gives the old fixed rule (cos ≥ 0.3 or Jaccard ≥ 0.2, ≥ 2 connected components) on
the real SAE and on the nulls, to show what it could not tell apart.

**Power** (``n_planted`` plantings per head and group size g ∈ {2, 3, 5} with 2g ≤ top_n; 0: not
measured). A planting replaces the head-h decoder blocks of 2g of head h's top features, chosen at
random, by two groups of g: in each group, block_i = ‖block_i‖ · (√ρ · u + √(1 − ρ) · e_i), u a random
unit direction of the group, e_i random unit directions orthogonal to u, ρ = ``planted_cos`` — so two
blocks of one group have cosine ≈ ρ, the two groups' directions are independent, and the norms (hence
the top set) are kept. Their output tokens are recomputed through the head (shared tokens follow from
the shared direction; none are planted separately). The planted head is tested as the real one: the
same calibrated relation and the same null draws, its p-value replacing the head's own among the real
heads' p-values for Benjamini–Hochberg. *Detected* = called polysemantic with each planted group inside
one group of the test and the two in different groups. ``power`` per head: ``{planted, detected,
by_group_size: {g: {planted, detected}}, cos, how}``; the summary gives the same over the heads with, per
g, the number of heads whose own detection rate is ≥ 0.8.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.load import Model
from ..runs import RunDir, read_tensors, write_json, write_tensors
from .options import AnalysisOptions
from .results import SAEAnalysisResult
from .attribution import weight_attribution
from .io import load_sae
from .train import sae_dir

OLD_COS, OLD_JACCARD = 0.3, 0.2


# -- pieces ----------------------------------------------------------------------------------------
def _top_features(w: torch.Tensor, alive: torch.Tensor, top_n: int) -> torch.Tensor:
    """[H, n]: per head, the ``top_n`` live features of largest attribution (``w`` [F, H])."""
    n = min(top_n, int(alive.sum()))
    return w.masked_fill(~alive[:, None], -1.0).topk(n, dim=0).indices.T


@torch.no_grad()
def _head_token_map(model: Model, layer: int, h: int) -> torch.Tensor:
    """[Dh, V]: logits that a unit of head h's z adds directly (W_O[h] · diag(γ_final) · W_Uᵀ)."""
    W_O = model.W_O(layer).detach().float().cpu()[h]                            # [Dh, d]
    gain = model.norm_gain(model.final_norm).detach().float().cpu()
    return (W_O * gain) @ model.W_U.detach().float().cpu().T


def _top_tokens(blocks: torch.Tensor, tmap: torch.Tensor, k: int, chunk: int = 128) -> torch.Tensor:
    """[..., k] ids of the k largest logits of each block ([..., Dh]) through ``tmap`` [Dh, V]."""
    flat = blocks.reshape(-1, blocks.shape[-1])
    out = [(flat[i:i + chunk] @ tmap).topk(min(k, tmap.shape[1]), dim=-1).indices for i in range(0, len(flat), chunk)]
    return torch.cat(out).reshape(*blocks.shape[:-1], -1)


def pair_similarity(blocks: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and token Jaccards between the features of each draw: ``blocks`` [D, n, Dh] and
    ``tokens`` [D, n, k] → (cos [D, n, n], jaccard [D, n, n])."""
    b = blocks / blocks.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = b @ b.transpose(-1, -2)
    k = tokens.shape[-1]
    inter = (tokens[:, :, None, :, None] == tokens[:, None, :, None, :]).sum((-1, -2)).double()
    return cos.double(), inter / (2 * k - inter)


def _upper(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """[..., n(n-1)/2]: the strict upper triangle of ``x`` [..., n, n]."""
    n = x.shape[-1]
    i, j = np.triu_indices(n, 1)
    return np.asarray(x)[..., i, j]


def _exceedance(null: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """P-value of each ``obs`` against the sample ``null``: (1 + #{null ≥ obs}) / (1 + N)."""
    s = np.sort(null)
    return (1 + len(s) - np.searchsorted(s, obs, side="left")) / (1 + len(s))


def group_sizes(related: np.ndarray) -> tuple[list[list[int]], int, int]:
    """Connected components of a boolean relation [n, n]: (groups with ≥ 2 members, largest first;
    k1; k2) where k1 ≥ k2 are the two largest group sizes (0 if absent)."""
    n = related.shape[0]
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i, j in zip(*np.nonzero(np.triu(related, 1))):
        parent[find(int(i))] = find(int(j))
    comps: dict[int, list[int]] = {}
    for i in range(n):
        comps.setdefault(find(i), []).append(i)
    groups = sorted((c for c in comps.values() if len(c) >= 2), key=len, reverse=True)
    sizes = [len(g) for g in groups] + [0, 0]
    return groups, sizes[0], sizes[1]


def component_labels(related: np.ndarray) -> np.ndarray:
    """Connected components of a stack of relations [..., n, n] (read from the upper triangle): [..., n]
    the smallest member of each feature's component (a singleton is its own label)."""
    n = related.shape[-1]
    up = np.triu(related, 1)
    reach = up | np.swapaxes(up, -1, -2) | np.eye(n, dtype=bool)
    while True:                                                                 # transitive closure by squaring
        r = reach.astype(np.float32)
        nxt = (r @ r) > 0
        if (nxt == reach).all():
            break
        reach = nxt
    return reach.argmax(-1)


def component_sizes(related: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`group_sizes` of a stack of relations [..., n, n] at once (read from the upper triangle, as
    there): (k1, k2, number of connected components counting singletons), each [...]."""
    n = related.shape[-1]
    if n == 0:
        zero = np.zeros(related.shape[:-2], dtype=int)
        return zero, zero, zero
    labels = component_labels(related)
    rep = labels == np.arange(n)                                                # smallest member of its component
    count = (labels[..., :, None] == np.arange(n)).sum(-2)                      # [..., n]: members labelled i
    sizes = np.concatenate([np.where(rep, count, 0), np.zeros((*related.shape[:-2], 2), dtype=int)], -1)
    top = -np.sort(-sizes, axis=-1)[..., :2]
    top = np.where(top >= 2, top, 0)
    return top[..., 0], top[..., 1], rep.sum(-1)


def _stat_p(obs: int, null: np.ndarray) -> float:
    """(1 + #{null ≥ obs}) / (1 + N); 1 when obs < 2 (no group at all is no evidence)."""
    return float(_p_many(np.array([obs]), [np.asarray(null)])[0])


def _bh(p: np.ndarray) -> np.ndarray:
    from scipy.stats import false_discovery_control
    return false_discovery_control(np.asarray(p, dtype=float), method="bh") if len(p) else np.zeros(0)


# -- the test ----------------------------------------------------------------------------------------
PLANTED_GROUP_SIZES = (2, 3, 5)
"""Sizes g of the two groups planted to measure the test's power (those with 2g ≤ top_n)."""


def power_how(top_n: int, cos: float) -> str:
    """One sentence: what a planting is and what counts as detected (module docstring, *Power*)."""
    return (f"two groups of g features planted among a head's top {top_n} (decoder blocks replaced, norms kept, "
            f"pairwise cosine ~{cos:g} within a group, random directions), tested against the same nulls with BH "
            f"over heads; detected = called polysemantic with the two planted groups in two different groups")


def plant_groups(blocks: torch.Tensor, g: int, cos: float, n_draws: int, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_draws`` plantings of two groups of ``g`` in one head's top-feature blocks ``blocks`` [n, Dh]:
    returns (planted blocks [D, n, Dh], planted positions [D, 2, g] into the n features). Block i of a
    group becomes ‖block_i‖ · (√cos · u + √(1 − cos) · e_i) with u the group's random unit direction and
    e_i random unit directions orthogonal to u."""
    n, Dh = blocks.shape
    pos = torch.rand(n_draws, n, generator=gen).argsort(-1)[:, :2 * g].reshape(n_draws, 2, g)
    u = torch.randn(n_draws, 2, 1, Dh, generator=gen)
    u = u / u.norm(dim=-1, keepdim=True)
    e = torch.randn(n_draws, 2, g, Dh, generator=gen)
    e = e - (e * u).sum(-1, keepdim=True) * u
    e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    new = cos ** 0.5 * u + (1 - cos) ** 0.5 * e                                  # [D, 2, g, Dh], unit rows
    flat = pos.reshape(n_draws, 2 * g)
    out = blocks.expand(n_draws, n, Dh).clone()
    norms = blocks.norm(dim=-1)[flat]                                           # [D, 2g]
    out.scatter_(1, flat[..., None].expand(-1, -1, Dh), new.reshape(n_draws, 2 * g, Dh) * norms[..., None])
    return out, pos


def _p_many(k: np.ndarray, nulls: list[np.ndarray]) -> np.ndarray:
    """Max over ``nulls`` ([N] each) of (1 + #{null ≥ k}) / (1 + N) for each observed ``k`` [D]; 1 where
    k < 2 (no group at all is no evidence)."""
    p = np.zeros(len(k))
    for null in nulls:
        s = np.sort(null)
        p = np.maximum(p, (1 + len(s) - np.searchsorted(s, k, side="left")) / (1 + len(s)))
    return np.where(k < 2, 1.0, p)


@torch.no_grad()
def polysemanticity(model: Model, sae, alive: torch.Tensor | None = None, top_n: int = 10, top_tokens: int = 10,
                    pair_alpha: float = 0.01, q: float = 0.05, n_null: int = 256, seed: int = 0,
                    n_planted: int = 0, planted_cos: float = 0.5, progress: bool = False) -> dict:
    """Per-head polysemanticity test against the two nulls, and its power from ``n_planted`` plantings per
    head and group size (module docstring). ``sae``: any SAE with ``cfg`` (layer, n_heads, d_head, d_sae)
    and ``W_dec`` [F, H·Dh]; ``alive``: bool [F]. Returns ``{"heads": {h: {...}}, "summary": {...}}``."""
    L, H, Dh, F = sae.cfg.layer, sae.cfg.n_heads, sae.cfg.d_head, sae.cfg.d_sae
    alive = torch.ones(F, dtype=torch.bool) if alive is None else alive.cpu().bool()
    dec = sae.W_dec.detach().float().cpu().reshape(F, H, Dh)
    w = weight_attribution(sae).detach().float().cpu()
    top = _top_features(w, alive, top_n)                                         # [H, n]
    n = top.shape[1]
    g = torch.Generator().manual_seed(seed)
    # null blocks per head: [D, H, n, Dh] for each source
    null_blocks = {"untrained": torch.empty(n_null, H, n, Dh), "permuted": torch.empty(n_null, H, n, Dh)}
    # the head each null block comes from: pairs from one source head keep the real structure of that
    # head, so only pairs of different sources calibrate the pair relation and count in the null's groups
    source = {"untrained": torch.arange(n_null * H * n).reshape(n_null, H, n),
              "permuted": torch.empty(n_null, H, n, dtype=torch.long)}
    perm_key = torch.empty(n_null, H, n, dtype=torch.long)                      # permuted block = dec[key // H, key % H]
    from tqdm import tqdm
    for d in tqdm(range(n_null), desc="polysemanticity nulls", unit=" draw", disable=not progress):
        u = type(sae)(sae.cfg, seed=seed + 1 + d)
        ud = u.W_dec.detach().float().cpu().reshape(F, H, Dh)
        ut = _top_features(weight_attribution(u).detach().float().cpu(), torch.ones(F, dtype=torch.bool), n)
        null_blocks["untrained"][d] = ud[ut, torch.arange(H)[:, None]]
        perm = torch.rand(F, H, generator=g).argsort(dim=1)                     # block perm[f, h] sits at head h
        pt = _top_features(w.gather(1, perm), alive, n)                         # [H, n]
        src = perm[pt, torch.arange(H)[:, None]]                                # [H, n]
        null_blocks["permuted"][d] = dec[pt, src]
        source["permuted"][d] = src
        perm_key[d] = pt * H + src
    sizes = [s for s in PLANTED_GROUP_SIZES if 2 * s <= n] if n_planted > 0 else []
    plant_gen = torch.Generator().manual_seed(seed + 7_919)                      # plantings: not the nulls' stream
    planted = {}                                                                # (h, g) -> (p [D], groups found [D])
    heads, k_null = {}, {s: np.zeros((n_null, H, 2), dtype=int) for s in null_blocks}
    old_null = {s: np.zeros((n_null, H), dtype=bool) for s in null_blocks}
    old_real = np.zeros(H, dtype=bool)
    for h in range(H):
        tmap = _head_token_map(model, L, h)
        real_blocks = dec[top[h], h][None]                                       # [1, n, Dh]
        real_tok = _top_tokens(real_blocks, tmap, top_tokens)
        sims = {"real": pair_similarity(real_blocks, real_tok)}
        for s, nb in null_blocks.items():
            if s == "permuted":   # real blocks, the same ones drawn again and again: each distinct one once
                keys, inv = perm_key[:, h].flatten().unique(return_inverse=True)
                tok = _top_tokens(dec.reshape(F * H, Dh)[keys], tmap, top_tokens)[inv].reshape(n_null, n, -1)
            else:
                tok = _top_tokens(nb[:, h], tmap, top_tokens)
            sims[s] = pair_similarity(nb[:, h], tok)
        cross = {s: (source[s][:, h, :, None] != source[s][:, h, None, :]).numpy() for s in null_blocks}
        cos_null = np.concatenate([_upper(sims[s][0])[_upper(cross[s])] for s in null_blocks])
        jac_null = np.concatenate([_upper(sims[s][1])[_upper(cross[s])] for s in null_blocks])

        def relation(cos, jac):
            p = np.minimum(_exceedance(cos_null, cos.numpy().ravel()), _exceedance(jac_null, jac.numpy().ravel()))
            return p.reshape(cos.shape) <= pair_alpha / 2

        rel = {k: relation(*v) for k, v in sims.items()}
        for s in null_blocks:
            k1, k2, _ = component_sizes(rel[s] & cross[s])                     # same-source pairs: not related
            k_null[s][:, h, 0], k_null[s][:, h, 1] = k1, k2
            old = (sims[s][0] >= OLD_COS).numpy() | (sims[s][1] >= OLD_JACCARD).numpy()
            old_null[s][:, h] = component_sizes(old)[2] >= 2
        old = (sims["real"][0][0] >= OLD_COS).numpy() | (sims["real"][1][0] >= OLD_JACCARD).numpy()
        old_real[h] = component_sizes(old)[2] >= 2
        for size in sizes:
            blocks, pos = plant_groups(real_blocks[0], size, planted_cos, n_planted, plant_gen)
            flat = pos.reshape(n_planted, -1)
            tok = real_tok.expand(n_planted, -1, -1).clone()
            new_tok = _top_tokens(blocks.gather(1, flat[..., None].expand(-1, -1, Dh)), tmap, top_tokens)
            tok.scatter_(1, flat[..., None].expand(-1, -1, tok.shape[-1]), new_tok)
            rel_p = relation(*pair_similarity(blocks, tok))                    # [D, n, n]
            lab = np.take_along_axis(component_labels(rel_p), flat.numpy(), -1).reshape(n_planted, 2, size)
            found = (lab == lab[..., :1]).all(-1).all(-1) & (lab[:, 0, 0] != lab[:, 1, 0])
            k2 = component_sizes(rel_p)[1]
            planted[h, size] = (_p_many(k2, [k_null[s][:, h, 1] for s in null_blocks]), found)
        groups, k1, k2 = group_sizes(rel["real"][0])
        feats = top[h].tolist()
        heads[h] = {
            "top_features": [{"feature": f, "attribution": round(float(w[f, h]), 4),
                              "top_tokens": model.token_str(real_tok[0, i, :5].tolist())} for i, f in enumerate(feats)],
            "groups": [[feats[i] for i in grp] for grp in groups],
            "n_groups": len(groups), "k1": k1, "k2": k2,
            "p_poly": max(_stat_p(k2, k_null[s][:, h, 1]) for s in null_blocks),
            "p_struct": max(_stat_p(k1, k_null[s][:, h, 0]) for s in null_blocks),
            "pair_threshold": {"cos": round(float(np.quantile(cos_null, 1 - pair_alpha / 2)), 4),
                               "jaccard": round(float(np.quantile(jac_null, 1 - pair_alpha / 2)), 4)},
            "null_mean_k2": {s: round(float(k_null[s][:, h, 1].mean()), 3) for s in null_blocks},
            "n_features_majority": int(((w[:, h] > 0.5) & alive).sum()),
        }
    p_real = np.array([heads[h]["p_poly"] for h in range(H)])
    q_poly = _bh(p_real)
    q_struct = _bh([heads[h]["p_struct"] for h in range(H)])
    for h in range(H):
        poly, struct = bool(q_poly[h] <= q), bool(q_struct[h] <= q)
        heads[h].update({"q_poly": float(q_poly[h]), "q_struct": float(q_struct[h]), "polysemantic": poly,
                         "verdict": "polysemantic" if poly else "one group" if struct else "no structure beyond the null"})
    power = _power(planted, p_real, H, sizes, n_planted, q) if sizes else None
    if power is not None:
        for h in range(H):
            heads[h]["power"] = power["heads"][h] | {"cos": planted_cos, "how": power_how(n, planted_cos)}
    summary = {
        "polysemantic_frac": float(np.mean([heads[h]["polysemantic"] for h in range(H)])),
        "structured_frac": float(np.mean([heads[h]["verdict"] != "no structure beyond the null" for h in range(H)])),
        "null_polysemantic_frac": {s: _null_rate(s, k_null, q) for s in null_blocks},
        "uncalibrated": {"rule": f"cos >= {OLD_COS} or token Jaccard >= {OLD_JACCARD}, >= 2 groups (singletons count)",
                         "real": float(old_real.mean())} | {s: float(old_null[s].mean()) for s in null_blocks},
        "power": None if power is None else power["summary"] | {"cos": planted_cos, "per_head": n_planted,
                                                                 "how": power_how(n, planted_cos)},
    }
    return {"heads": heads, "summary": summary}


def _power(planted: dict, p_real: np.ndarray, H: int, sizes: list[int], n_planted: int, q: float) -> dict:
    """Detections of the plantings: each planted head's p replaces its own among ``p_real`` [H] for BH.
    ``planted[(h, g)]`` = (p [D], planted groups found apart [D]). Returns {"heads": {h: {planted, detected,
    by_group_size}}, "summary": {planted, detected, by_group_size: {g: {planted, detected, rate,
    heads_power_80}}}}."""
    heads = {h: {"planted": 0, "detected": 0, "by_group_size": {}} for h in range(H)}
    total = {str(size): {"planted": 0, "detected": 0, "heads_power_80": 0} for size in sizes}
    for (h, size), (p, found) in planted.items():
        ps = np.repeat(p_real[None], len(p), 0)
        ps[:, h] = p
        det = int(((_bh_rows(ps)[:, h] <= q) & found).sum())
        heads[h]["by_group_size"][str(size)] = {"planted": n_planted, "detected": det}
        heads[h]["planted"] += n_planted
        heads[h]["detected"] += det
        t = total[str(size)]
        t["planted"] += n_planted
        t["detected"] += det
        t["heads_power_80"] += int(det >= 0.8 * n_planted)
    for t in total.values():
        t["rate"] = t["detected"] / t["planted"]
    return {"heads": heads, "summary": {"planted": sum(t["planted"] for t in total.values()),
                                        "detected": sum(t["detected"] for t in total.values()),
                                        "heads": H, "by_group_size": total}}


def _bh_rows(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg q-values of each row of ``p`` [D, H]."""
    from scipy.stats import false_discovery_control
    return false_discovery_control(p, axis=-1, method="bh")


def _null_rate(source: str, k_null: dict, q: float) -> float:
    """Mean over the draws of ``source`` of the fraction of heads the test calls polysemantic when
    that draw is the SAE under test (its p-values against the other draws of both nulls)."""
    from scipy.stats import false_discovery_control
    k2 = {s: v[..., 1] for s, v in k_null.items()}                             # [D, H]
    obs = k2[source]
    p = np.zeros(obs.shape)
    for s, null in k2.items():
        ge = (null[None] >= obs[:, None]).sum(1)                                # [D, H]: #{null draws ≥ obs}
        n = len(null)
        if s == source:                                                         # leave the draw itself out
            ge, n = ge - 1, n - 1
        p = np.maximum(p, (1 + ge) / (1 + n))
    p = np.where(obs < 2, 1.0, p)
    rates = (false_discovery_control(p, axis=-1, method="bh") <= q).mean(-1)
    return float(np.mean(rates))


# -- the stage -----------------------------------------------------------------------------------------
def run_analysis(model: Model, run: RunDir, opts: AnalysisOptions, progress: bool = True) -> SAEAnalysisResult:
    """Weight attribution [F, H], the per-head polysemanticity test of SAE ``opts.name`` and its power;
    writes ``attribution.safetensors`` and ``heads.json`` (last) ({name, layer, criterion, alive_known, heads:
    {"h": {top_features, groups, n_groups, k1, k2, p_poly, q_poly, p_struct, q_struct, polysemantic,
    verdict, pair_threshold, null_mean_k2, n_features_majority, power {planted, detected, by_group_size
    {g: {planted, detected}}, cos, how}}}, polysemantic_frac, structured_frac, null_polysemantic_frac
    {untrained, permuted}, uncalibrated {rule, real, untrained, permuted}, power {planted, detected, heads,
    by_group_size {g: {planted, detected, rate, heads_power_80}}, cos, per_head, how}}); ``power`` is
    absent per head and None overall when ``n_planted`` is 0. Uses ``feature_counts.safetensors`` of
    ``sae eval`` when present (dead features left out)."""
    folder = sae_dir(run, opts.name)
    sae = load_sae(folder, model)
    alive = None
    if (folder / "feature_counts.safetensors").is_file():
        alive = read_tensors(folder / "feature_counts.safetensors")["counts"] > 0
    w = weight_attribution(sae)
    res = polysemanticity(model, sae, alive, top_n=opts.top_n, top_tokens=opts.top_tokens, pair_alpha=opts.pair_alpha,
                          q=opts.q, n_null=opts.n_null, seed=opts.seed, n_planted=opts.n_planted,
                          planted_cos=opts.planted_cos, progress=progress)
    out = {"name": opts.name, "layer": sae.cfg.layer,
           "criterion": {"top_n": opts.top_n, "top_tokens": opts.top_tokens, "pair_alpha": opts.pair_alpha, "q": opts.q,
                         "n_null": opts.n_null, "nulls": ["untrained", "permuted"],
                         "null_pairs": "different source heads only (calibration and the nulls' groups)",
                         "multiple_comparisons": "Benjamini-Hochberg over heads",
                         "n_planted": opts.n_planted, "planted_cos": opts.planted_cos},
           "alive_known": alive is not None,
           "heads": {str(h): v for h, v in res["heads"].items()}} | res["summary"]
    write_tensors(folder / "attribution.safetensors", {"weight_attribution": w})
    write_json(folder / "heads.json", out)
    return SAEAnalysisResult(name=opts.name, layer=sae.cfg.layer, heads=len(out["heads"]), **res["summary"])
