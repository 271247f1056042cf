"""Step 1 (``find``): next-token neurons by congruence of their output weight with the unembedding.

Notation: M neurons per layer, d model dim, V vocabulary. For neuron n of layer l with output weight
w_n = W_out[n, :] ∈ R^d (the down projection for gated MLPs), its vocabulary projection is

    c_n = W̃_U · w_n ∈ R^V,    W̃_U = W_U ⊙ γ_final   (final-norm gain folded into the unembedding)

and, with ``unembed="centred"`` (the default), W̃_U is centred over the vocabulary,
W̃_U[t] ← W̃_U[t] − mean_t' W̃_U[t'], as TransformerLens does with ``center_unembed=True`` (its
default, so also the reference code's). Centring subtracts mean_t c_n[t] from every logit of neuron n:
the softmax ignores that shift, so only the centred c_n is what the neuron does to the *prediction*.
It leaves each neuron's token (the argmax), kurtosis and skew unchanged, but moves ``dot`` by a
neuron-specific constant and changes ``cos`` (the rows' norms change), hence the ranking *between*
neurons. ``unembed="raw"`` keeps the uncentred W̃_U.

and, for LayerNorm models, w_n is centred first (LayerNorm removes the mean of the residual), as
TransformerLens does with ``fold_ln=True, center_writing_weights=True`` in the reference code.

* **dot**: max_t c_n[t] (prediction neurons) or −min_t c_n[t] (``kind="suppression"``); the argmax
  (argmin) token is the neuron's token.
* **cos**: the same entry divided by ‖w_n‖·‖W̃_U[t]‖.
* **kurtosis** and **skew** of c_n over the vocabulary (standardised moments; kurtosis not excess):
  Gurnee et al.'s prediction neurons have high kurtosis and positive skew, suppression neurons high
  kurtosis and negative skew.

Filters from the reference code (options): the token starts with a space and has at least
``min_chars`` characters after it; a reject list of glitch tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import HeadscopeError
from ..models.load import Model

RANK_BY = ("dot", "cos", "kurtosis", "skew")
UNEMBED = ("centred", "raw")
KINDS = ("prediction", "suppression")
DEFAULT_REJECT = ("ÃÂÃÂ", "ÃÂ", "SPONSORED", "embedreportprint", "externalToEVA", "rawdownload",
                  "TheNitrome", "oreAndOnline", "InstoreAndOnline", "natureconservancy", "guiActiveUn",
                  "StreamerBot", "cloneembedreportprint", "RandomRedditor", "PsyNetMessage")


def folded_unembed(model: Model, unembed: str = "centred") -> torch.Tensor:
    """W̃_U = W_U ⊙ γ_final, [V, d] float32 (the final norm's gain folded in), centred over the
    vocabulary (each of the d columns has mean 0 over the V tokens) unless ``unembed="raw"``."""
    if unembed not in UNEMBED:
        raise HeadscopeError(f"unknown unembedding convention '{unembed}' (choose from {', '.join(UNEMBED)})")
    gain = model.norm_gain(model.final_norm).float()
    WU = model.W_U.detach().float() * gain[None, :]
    return WU - WU.mean(dim=0, keepdim=True) if unembed == "centred" else WU


def output_weights(model: Model, layer: int) -> torch.Tensor:
    """W_out of ``layer`` as [M, d] float32, centred over d for LayerNorm models."""
    w = model.W_out(layer).detach().float()
    if model.arch.norm_kind == "layernorm":
        w = w - w.mean(dim=1, keepdim=True)
    return w


@dataclass
class LayerCongruence:
    """Per-neuron statistics of one layer, each [M]: ``dot``, ``cos``, ``token`` (int64), ``kurtosis``,
    ``skew``, ``mean``, ``std`` of the vocabulary projection."""

    dot: torch.Tensor
    cos: torch.Tensor
    token: torch.Tensor
    kurtosis: torch.Tensor
    skew: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def layer_congruence(model: Model, layer: int, kind: str = "prediction", chunk: int = 256,
                     unembed: str = "centred") -> LayerCongruence:
    """Congruence statistics for every neuron of ``layer`` (chunks of ``chunk`` neurons bound memory
    to chunk × V floats)."""
    if kind not in KINDS:
        raise HeadscopeError(f"unknown neuron kind '{kind}' (choose from {', '.join(KINDS)})")
    WU = folded_unembed(model, unembed).to(model.device)
    WU_norm = WU.norm(dim=1)
    W = output_weights(model, layer).to(model.device)
    outs = {k: [] for k in ("dot", "cos", "token", "kurtosis", "skew", "mean", "std")}
    for s in range(0, W.shape[0], chunk):
        w = W[s:s + chunk]
        c = w @ WU.T                                                    # [m, V]
        sign = 1.0 if kind == "prediction" else -1.0
        best, tok = (sign * c).max(dim=1)
        mu = c.mean(dim=1, keepdim=True)
        sd = c.std(dim=1, unbiased=False, keepdim=True).clamp_min(1e-12)
        zs = (c - mu) / sd
        outs["dot"].append(best)
        outs["cos"].append(best / (w.norm(dim=1) * WU_norm[tok]).clamp_min(1e-12))
        outs["token"].append(tok)
        outs["kurtosis"].append((zs ** 4).mean(dim=1))
        outs["skew"].append((zs ** 3).mean(dim=1))
        outs["mean"].append(mu[:, 0])
        outs["std"].append(sd[:, 0])
    return LayerCongruence(**{k: torch.cat(v).cpu() for k, v in outs.items()})


def token_passes(text: str, require_space: bool, min_chars: int, reject: set[str]) -> bool:
    """The reference filters: starts with a space (option), ≥ ``min_chars`` characters after the
    leading space, not on the reject list (compared stripped)."""
    if require_space and not text.startswith(" "):
        return False
    stripped = text.strip()
    if len(stripped) < min_chars:
        return False
    return stripped not in reject and text not in reject


def _first_passing(model: Model, lc, order: list[int], k: int, require_space: bool, min_chars: int,
                   reject_set: set[str], vocab_cache: dict[int, str]) -> tuple[list[int], int]:
    """The first ``k`` neurons of ``order`` whose most congruent token (``lc.token``) passes the token filters,
    and how many of ``order`` pass (``vocab_cache``: token id → text, filled as tokens are decoded)."""
    passed, chosen = 0, []
    for n in order:
        t = int(lc.token[n])
        if t not in vocab_cache:
            vocab_cache[t] = model.tokenizer.decode([t])
        if token_passes(vocab_cache[t], require_space, min_chars, reject_set):
            passed += 1
            if len(chosen) < k:
                chosen.append(n)
    return chosen, passed


def find_neurons(model: Model, layers: list[int], per_layer: int = 20, rank_by: str = "dot",
                 kind: str = "prediction", require_space: bool = True, min_chars: int = 3,
                 reject: tuple[str, ...] | list[str] = DEFAULT_REJECT, top_tokens: int = 10,
                 unembed: str = "centred") -> dict:
    """The top ``per_layer`` neurons of each layer by ``rank_by`` among those whose token passes the
    filters. Returns ``{"neurons": [...], "per_layer": {layer: {"candidates", "passed"}}}``; each
    neuron is a dict with layer, neuron, token_id, token, dot, cos, kurtosis, skew, rank, top_tokens."""
    if rank_by not in RANK_BY:
        raise HeadscopeError(f"unknown ranking '{rank_by}' (choose from {', '.join(RANK_BY)})")
    if per_layer < 1:
        raise HeadscopeError(f"--per-layer must be at least 1, got {per_layer}")
    if not layers:
        raise HeadscopeError("no layers to search for neurons")
    reject_set = {r.strip() for r in reject}
    WU = folded_unembed(model, unembed)
    vocab_cache: dict[int, str] = {}
    neurons, stats = [], {}
    for layer in layers:
        model.check_layer(layer)
        lc = layer_congruence(model, layer, kind, unembed=unembed)
        key = {"dot": lc.dot, "cos": lc.cos, "kurtosis": lc.kurtosis,
               "skew": lc.skew if kind == "prediction" else -lc.skew}[rank_by]
        order = torch.argsort(key, descending=True)
        chosen, passed = _first_passing(model, lc, order.tolist(), per_layer, require_space, min_chars, reject_set,
                                        vocab_cache)
        stats[str(layer)] = {"candidates": int(lc.dot.numel()), "passed": passed}
        W = output_weights(model, layer)
        for rank, n in enumerate(chosen):
            proj = WU @ W[n]
            sign = 1.0 if kind == "prediction" else -1.0
            tops = torch.topk(sign * proj, top_tokens).indices.tolist()
            neurons.append({
                "layer": layer, "neuron": n, "token_id": int(lc.token[n]), "token": vocab_cache[int(lc.token[n])],
                "dot": float(lc.dot[n]), "cos": float(lc.cos[n]), "kurtosis": float(lc.kurtosis[n]),
                "skew": float(lc.skew[n]), "rank": rank,
                "top_tokens": [[int(t), model.tokenizer.decode([t]), float(proj[t])] for t in tops]})
    if not neurons:
        raise HeadscopeError(
            f"no neuron in layers {layers} passes the filters (token starts with a space: {require_space}, "
            f"at least {min_chars} characters, {len(reject_set)} rejected tokens); try --no-require-space, "
            f"a smaller --min-chars, more --layers or --kind suppression")
    return {"neurons": neurons, "per_layer": stats}


def random_neurons(model: Model, layers: list[int], per_layer: int, seed: int = 0,
                   kind: str = "prediction", unembed: str = "centred", require_space: bool = True,
                   min_chars: int = 3, reject: tuple[str, ...] | list[str] = DEFAULT_REJECT) -> dict:
    """The random-neuron baseline: ``per_layer`` neurons drawn uniformly (seeded) from those of each layer whose
    most congruent token passes the **same token filters** as :func:`find_neurons` (``require_space``,
    ``min_chars``, ``reject``), so a random neuron predicts the same kind of token as a congruent one (a word
    with a leading space, not a sub-word piece the explainer's prompt format would cut) and the two sets differ
    only in how they were ranked. Each neuron's token is its most congruent one, as for the top set."""
    g = torch.Generator().manual_seed(seed)
    reject_set = {r.strip() for r in reject}
    vocab_cache: dict[int, str] = {}
    neurons, stats = [], {}
    for layer in layers:
        model.check_layer(layer)
        lc = layer_congruence(model, layer, kind, unembed=unembed)
        picks, passed = _first_passing(model, lc, torch.randperm(model.d_mlp, generator=g).tolist(), per_layer,
                                       require_space, min_chars, reject_set, vocab_cache)
        stats[str(layer)] = {"candidates": model.d_mlp, "passed": passed}
        for rank, n in enumerate(picks):
            t = int(lc.token[n])
            neurons.append({"layer": layer, "neuron": n, "token_id": t, "token": vocab_cache[t],
                            "dot": float(lc.dot[n]), "cos": float(lc.cos[n]), "kurtosis": float(lc.kurtosis[n]),
                            "skew": float(lc.skew[n]), "rank": rank, "top_tokens": []})
    if not neurons:
        raise HeadscopeError(f"no neuron in layers {layers} has a token that passes the filters (random set)")
    return {"neurons": neurons, "per_layer": stats}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def top_set_overlap(model: Model, layers: list[int], per_layer: int = 20, rank_by: str = "dot",
                    kind: str = "prediction") -> dict:
    """How much the unembedding convention changes the chosen neurons: per layer, the top ``per_layer``
    neurons by ``rank_by`` (no token filters) under the centred and the raw W̃_U, their overlap and
    Jaccard index, and the Spearman correlation of the two rankings over all neurons of the layer."""
    from scipy.stats import spearmanr
    out = {}
    for layer in layers:
        keys = {}
        for u in UNEMBED:
            lc = layer_congruence(model, layer, kind, unembed=u)
            keys[u] = {"dot": lc.dot, "cos": lc.cos, "kurtosis": lc.kurtosis,
                       "skew": lc.skew if kind == "prediction" else -lc.skew}[rank_by]
        tops = {u: set(torch.topk(keys[u], per_layer).indices.tolist()) for u in UNEMBED}
        inter = len(tops["centred"] & tops["raw"])
        out[str(layer)] = {"overlap": inter, "jaccard": inter / len(tops["centred"] | tops["raw"]),
                           "spearman": float(spearmanr(keys["centred"].numpy(), keys["raw"].numpy()).statistic)}
    return out
