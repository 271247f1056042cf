"""Read a head in context: on one prompt, per position, where the head looks and whether what it writes
raises the token it looks at (copying) or the token after it (induction).

Per head and destination position t ≥ 1:

* ``src[t]``: the source s ∈ 1..t the head attends to most (position 0, BOS, is the same in every prompt and
  is left out of the argmax; its weight is reported as ``bos[t]``), and ``weight[t]`` = pattern[t, src];
* ``dla_rank_src[t]`` / ``dla_rank_next[t]``: the rank (1 = top of the vocabulary, ties counted against it) of the attended token
  ids[src] and of the token after it ids[src + 1] (only when src + 1 ≤ t: never a future token) in the head's
  **direct logit contribution** at t: r_h[t] through the final norm's actual scale at t (1/σ of the final
  residual stream, the norm's gain γ; a LayerNorm also centres r_h) times W_U. Centring W_U over the
  vocabulary shifts every logit of a row by one constant, so the ranks are those of the centred W_U;
* ``dla_top[t]``: the head's top-k tokens by that contribution;
* with a lens bank for the head: ``lens_rank_src[t]`` / ``lens_rank_next[t]`` (ranks in the head's lens
  distribution) and ``lens[t]`` / ``lens_prob[t]`` / ``lens_term[t]``: its top-k tokens ranked by their
  term q·log(q/q_null) of KL(lens ‖ null) (:func:`headscope.lens.apply.kl_terms`, the ranking ``lens show``
  uses), only terms above ``MIN_TERM_BITS``.

Position 0 holds empty lists / None. Models with a post-attention norm (Gemma-2) have no direct logit
contribution per head here (their r_h is not what reaches the residual stream): the DLA fields are None.
"""

from __future__ import annotations

import torch

from ..capture import capture
from ..models.load import Model


def ranks_of(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1-based rank of ``target`` [N] in each row of ``logits`` [N, V]: how many tokens score at least as high
    (ties count against the target, so a head that writes nothing ranks every token last, never first)."""
    t = logits.gather(-1, target.clamp(min=0).unsqueeze(-1))
    return (logits >= t).sum(-1)


def final_scale(model: Model, resid: torch.Tensor) -> torch.Tensor:
    """1/σ of the final norm at each position of the final residual stream ``resid`` [S, d] → [S, 1]."""
    from ..sae.attribution import _norm_scale
    return _norm_scale(model, model.final_norm, resid.float())


@torch.no_grad()
def read_in_context(model: Model, ids: torch.Tensor, layers: list[int] | None = None, bank=None, null=None,
                    gains: dict | None = None, k: int = 5, heads: list[tuple[int, int]] | None = None) -> dict[str, dict]:
    """Every head of ``layers`` (default all; ``heads``: only these (layer, head)) on ``ids`` [1, S] (see the
    module docstring):
    {"L.H": {"src", "weight", "bos", "dla_rank_src", "dla_rank_next", "dla_top", ["lens", "lens_prob",
    "lens_term", "lens_rank_src", "lens_rank_next", "gain", "informative"]}} — lists of length S.
    ``bank``/``null``/``gains``: the run's lenses, null lens logits [V] and per-head eval metrics
    (:func:`headscope.lens.apply.load_gains`); heads without a lens get no lens fields."""
    from ..lens.apply import MIN_TERM_BITS, kl_terms
    ids = ids.reshape(1, -1).to(model.device)
    S, H, L = ids.shape[1], model.n_heads, model.n_layers
    if heads is not None:
        layers = sorted({l for l, _ in heads})
    layers = list(range(L)) if layers is None else sorted(set(layers))
    pick = {l: (list(range(H)) if heads is None else sorted({h for ll, h in heads if ll == l})) for l in layers}
    cap = capture(model, ids, layers=sorted(set(layers) | {L - 1}), what={"pattern", "result", "resid_post"})
    tok = ids[0]
    W_U = model.W_U.detach().float()
    gamma = model.norm_gain(model.final_norm).detach().float()
    inv = final_scale(model, cap["resid_post"][L - 1][0])                       # [S, 1]
    dla_ok = not getattr(model.arch, "post_attn_norm", False)
    out: dict[str, dict] = {}
    lens_sites = set(map(tuple, bank.sites)) if bank is not None else set()
    for layer in layers:
        pat = cap["pattern"][layer][0].float()                                  # [H, S, S]
        src = torch.zeros(H, S, dtype=torch.long)
        if S > 1:
            src[:, 1:] = pat[:, 1:, 1:].tril().argmax(-1).cpu() + 1             # s in 1..t
        weight = pat.gather(-1, src.to(pat.device).unsqueeze(-1)).squeeze(-1).cpu()
        nxt_pos = src + 1
        has_next = nxt_pos <= torch.arange(S).unsqueeze(0)                      # src + 1 <= t
        tgt_src = tok.cpu()[src]                                                # [H, S]
        tgt_next = torch.where(has_next, tok.cpu()[nxt_pos.clamp(max=S - 1)], torch.full_like(src, -1))
        dla_src = dla_next = None
        dla_top_i = None
        hs = pick[layer]
        if dla_ok and hs:
            r = cap["result"][layer][0][:, hs].float()                          # [S, H', d]
            if model.arch.norm_kind == "layernorm":
                r = r - r.mean(-1, keepdim=True)
            c = (r * inv.unsqueeze(1) * gamma).transpose(0, 1).reshape(len(hs) * S, -1)
            lg = c @ W_U.T                                                      # [H'·S, V]
            shape = (len(hs), S)
            dla_src = dict(zip(hs, ranks_of(lg, tgt_src[hs].reshape(-1).to(lg.device)).reshape(shape).cpu()))
            dla_next = dict(zip(hs, ranks_of(lg, tgt_next[hs].reshape(-1).to(lg.device)).reshape(shape).cpu()))
            dla_top_i = dict(zip(hs, lg.topk(k, -1).indices.reshape(*shape, k).cpu()))
            del lg
        here = [h for h in hs if (layer, h) in lens_sites]
        lens_block = {}
        if here:
            from ..lens.apply import _sub_logits, select_sites
            sites = [(layer, h) for h in here]
            R = cap["result"][layer][0][:, here].float().transpose(0, 1)        # [K, S, d], as lens.collect.site_batch
            logq = torch.log_softmax(_sub_logits(bank, R, select_sites(bank, sites)).float(), -1)  # [K, S, V]
            K = len(here)
            ls = ranks_of(logq.reshape(K * S, -1), tgt_src[here].reshape(-1).to(logq.device)).reshape(K, S).cpu()
            ln = ranks_of(logq.reshape(K * S, -1), tgt_next[here].reshape(-1).to(logq.device)).reshape(K, S).cpu()
            term = kl_terms(logq, null) if null is not None else logq
            top = term.topk(k, -1)
            lens_block = {h: (ls[j], ln[j], top.indices[j].cpu(), logq[j].gather(-1, top.indices[j]).exp().cpu(),
                              top.values[j].cpu() if null is not None else None) for j, h in enumerate(here)}
            del logq, term
        all_ids = sorted({int(i) for x in (dla_top_i or {}).values() for i in x.reshape(-1).tolist()}
                         | {int(i) for b in lens_block.values() for i in b[2].reshape(-1).tolist()})
        text = dict(zip(all_ids, model.token_str(all_ids))) if all_ids else {}
        for h in hs:
            rec = {"src": [None] + src[h, 1:].tolist(), "weight": [None] + [round(x, 3) for x in weight[h, 1:].tolist()],
                   "bos": [None] + [round(float(x), 3) for x in pat[h, 1:, 0].tolist()],
                   "dla_rank_src": None, "dla_rank_next": None, "dla_top": None}
            nxt_ok = has_next[h].tolist()
            if dla_src is not None:
                rec["dla_rank_src"] = [None] + dla_src[h][1:].tolist()
                rec["dla_rank_next"] = [None] + [int(v) if ok else None for v, ok in zip(dla_next[h][1:].tolist(), nxt_ok[1:])]
                rec["dla_top"] = [[]] + [[text[i] for i in row] for row in dla_top_i[h][1:].tolist()]
            if h in lens_block:
                ls, ln, ti, tp, tt = lens_block[h]
                keep = [[tt is None or tt[t, c] > MIN_TERM_BITS for c in range(ti.shape[1])] for t in range(S)]
                g = (gains or {}).get(f"{layer}.{h}") or {}
                rec.update({
                    "lens_rank_src": [None] + ls[1:].tolist(),
                    "lens_rank_next": [None] + [int(v) if ok else None for v, ok in zip(ln[1:].tolist(), nxt_ok[1:])],
                    "lens": [[]] + [[text[int(i)] for i, kp in zip(ti[t].tolist(), keep[t]) if kp] for t in range(1, S)],
                    "lens_prob": [[]] + [[round(float(p), 4) for p, kp in zip(tp[t].tolist(), keep[t]) if kp]
                                         for t in range(1, S)],
                    "lens_term": None if tt is None else [[]] + [[round(float(x), 4) for x, kp in zip(tt[t].tolist(), keep[t]) if kp]
                                                                 for t in range(1, S)],
                    "gain": g.get("gain"), "informative": bool(g.get("informative")) if g else None})
            out[f"{layer}.{h}"] = rec
    return out
