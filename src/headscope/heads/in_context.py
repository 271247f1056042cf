"""Read a head in context: on one prompt, per position, where the head looks and whether what it writes
raises the token it looks at (copying) or the token after it (induction).

Per head and destination position t ≥ 1:

* ``src[t]``: the source s ∈ 1..t the head attends to most (position 0, BOS, is the same in every prompt and
  is left out of the argmax; its weight is reported as ``bos[t]``), and ``weight[t]`` = pattern[t, src];
* ``dla_rank_src[t]`` / ``dla_rank_next[t]``: the rank (1 = top of the vocabulary, ties counted against it,
  exact below ``RANK_CAP`` = 100, else 100 meaning "100 or worse") of the attended token
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


RANK_CAP = 100
"""Ranks are exact below this; a token ranked RANK_CAP or worse is reported as RANK_CAP ("≥ 100")."""


def ranks_of(logits: torch.Tensor, target: torch.Tensor, top_values: torch.Tensor | None = None,
             cap: int = RANK_CAP) -> torch.Tensor:
    """1-based rank of ``target`` [N] in each row of ``logits`` [N, V]: how many tokens score at least as high
    (ties count against the target, so a head that writes nothing never ranks a token first), capped at
    ``cap``. ``top_values``: the rows' ``cap`` largest values, sorted (``logits.topk(cap)``): with them only
    those are compared (a rank below ``cap`` is exact: every token scoring at least as high is among them)."""
    t = logits.gather(-1, target.clamp(min=0).unsqueeze(-1))
    if top_values is None:
        top_values = logits.topk(min(cap, logits.shape[-1]), -1).values
    return (top_values >= t).sum(-1, dtype=torch.int32).clamp(max=cap)


def final_scale(model: Model, resid: torch.Tensor) -> torch.Tensor:
    """1/σ of the final norm at each position of the final residual stream ``resid`` [S, d] → [S, 1]."""
    from ..sae.attribution import _norm_scale
    return _norm_scale(model, model.final_norm, resid.float())


ROWS = 2048
"""(head, position) rows per unembedding block: one [ROWS, V] float32 block at a time (0.4 GB at V = 49k).
Large blocks matter on CPU: W_U (V·d floats) is streamed once per block, not once per layer."""


def _ranks_and_top(logits: torch.Tensor, t_src: torch.Tensor, t_next: torch.Tensor, k: int, order=None):
    """Capped ranks of the two targets [N] and the top-k indices [N, k] of ``order`` (default ``logits``)
    [N, V]; one top-``RANK_CAP`` selection serves the ranks (and the top-k when ranking by ``logits``)."""
    top = logits.topk(max(k, min(RANK_CAP, logits.shape[-1])), -1)
    tk = top.indices[:, :k] if order is None else order.topk(k, -1).indices
    return ranks_of(logits, t_src, top.values), ranks_of(logits, t_next, top.values), tk


@torch.no_grad()
def read_in_context(model: Model, ids: torch.Tensor, layers: list[int] | None = None, bank=None, null=None,
                    gains: dict | None = None, k: int = 5, heads: list[tuple[int, int]] | None = None) -> dict[str, dict]:
    """Every head of ``layers`` (default all; ``heads``: only these (layer, head)) on ``ids`` [1, S] (see the
    module docstring):
    {"L.H": {"src", "weight", "bos", "dla_rank_src", "dla_rank_next", "dla_top", ["lens", "lens_prob",
    "lens_term", "lens_rank_src", "lens_rank_next", "gain", "informative"]}} — lists of length S.
    ``bank``/``null``/``gains``: the run's lenses, null lens logits [V] and per-head eval metrics
    (:func:`headscope.lens.apply.load_gains`); heads without a lens get no lens fields."""
    from ..lens.apply import MIN_TERM_BITS, _sub_logits, kl_terms, select_sites
    ids = ids.reshape(1, -1).to(model.device)
    S, H, L = ids.shape[1], model.n_heads, model.n_layers
    if heads is not None:
        layers = sorted({l for l, _ in heads})
    layers = list(range(L)) if layers is None else sorted(set(layers))
    sites = [(l, h) for l in layers for h in (range(H) if heads is None else sorted({h for ll, h in heads if ll == l}))]
    if not sites:
        return {}
    cap = capture(model, ids, layers=sorted(set(layers) | {L - 1}), what={"pattern", "result", "resid_post"})
    tok = ids[0].cpu()
    # where each head looks: the most-attended source s in 1..t, its weight, BOS's weight     [K, S]
    pats = torch.stack([cap["pattern"][l][0, h].float().cpu() for l, h in sites])            # [K, S, S]
    src = torch.zeros(len(sites), S, dtype=torch.long)
    if S > 1:
        src[:, 1:] = pats[:, 1:, 1:].tril().argmax(-1) + 1
    weight = pats.gather(-1, src.unsqueeze(-1)).squeeze(-1)
    bos = pats[:, :, 0]
    has_next = (src + 1) <= torch.arange(S).unsqueeze(0)                                     # src + 1 <= t
    t_src = tok[src]
    t_next = torch.where(has_next, tok[(src + 1).clamp(max=S - 1)], torch.zeros_like(src))
    R = torch.stack([cap["result"][l][0, :, h].float() for l, h in sites])                 # [K, S, d]
    N = len(sites) * S
    dla = None
    if not getattr(model.arch, "post_attn_norm", False):
        W_U = model.W_U.detach().float()
        gamma = model.norm_gain(model.final_norm).detach().float()
        inv = final_scale(model, cap["resid_post"][L - 1][0])                               # [S, 1]
        C = R - R.mean(-1, keepdim=True) if model.arch.norm_kind == "layernorm" else R
        C = (C * inv * gamma).reshape(N, -1)                                                # [K·S, d]
        rs, rn, ti = torch.empty(N, dtype=torch.int32), torch.empty(N, dtype=torch.int32), torch.empty(N, k, dtype=torch.long)
        ts, tn = t_src.reshape(-1).to(C.device), t_next.reshape(-1).to(C.device)
        for a in range(0, N, ROWS):
            lg = C[a:a + ROWS] @ W_U.T                                                      # [rows, V]
            x, y, top_i = _ranks_and_top(lg, ts[a:a + ROWS], tn[a:a + ROWS], k)
            rs[a:a + ROWS], rn[a:a + ROWS], ti[a:a + ROWS] = x.cpu(), y.cpu(), top_i.cpu()
            del lg
        dla = (rs.reshape(-1, S), rn.reshape(-1, S), ti.reshape(-1, S, k))
    lens_rows = [j for j, lh in enumerate(sites) if bank is not None and tuple(lh) in set(map(tuple, bank.sites))]
    lens: dict[int, tuple] = {}
    per_block = max(1, ROWS // max(S, 1))
    for a in range(0, len(lens_rows), per_block):
        js = lens_rows[a:a + per_block]
        logq = torch.log_softmax(_sub_logits(bank, R[js], select_sites(bank, [sites[j] for j in js])).float(), -1)
        Kb = len(js)
        flat = logq.reshape(Kb * S, -1)
        term = kl_terms(flat, null) if null is not None else None
        ls, ln, ti = _ranks_and_top(flat, t_src[js].reshape(-1).to(flat.device), t_next[js].reshape(-1).to(flat.device),
                                    k, order=term)
        ls, ln, ti = ls.reshape(Kb, S).cpu(), ln.reshape(Kb, S).cpu(), ti.reshape(Kb, S, -1)
        probs = logq.gather(-1, ti).exp().cpu()
        tv = term.reshape(Kb, S, -1).gather(-1, ti).cpu() if term is not None else None
        for b, j in enumerate(js):
            lens[j] = (ls[b], ln[b], ti[b].cpu(), probs[b], tv[b] if tv is not None else None)
        del logq, term, flat
    all_ids = set(dla[2].reshape(-1).tolist()) if dla is not None else set()
    for v in lens.values():
        all_ids |= set(v[2].reshape(-1).tolist())
    all_ids = sorted(all_ids)
    text = dict(zip(all_ids, model.token_str(all_ids))) if all_ids else {}
    out: dict[str, dict] = {}
    for j, (layer, h) in enumerate(sites):
        nxt_ok = has_next[j].tolist()
        rec = {"src": [None] + src[j, 1:].tolist(), "weight": [None] + [round(x, 3) for x in weight[j, 1:].tolist()],
               "bos": [None] + [round(x, 3) for x in bos[j, 1:].tolist()],
               "dla_rank_src": None, "dla_rank_next": None, "dla_top": None, "rank_cap": RANK_CAP}
        if dla is not None:
            rec["dla_rank_src"] = [None] + dla[0][j, 1:].tolist()
            rec["dla_rank_next"] = [None] + [int(v) if ok else None for v, ok in zip(dla[1][j, 1:].tolist(), nxt_ok[1:])]
            rec["dla_top"] = [[]] + [[text[i] for i in row] for row in dla[2][j, 1:].tolist()]
        if j in lens:
            ls, ln, ti, tp, tt = lens[j]
            keep = [[tt is None or float(tt[t, c]) > MIN_TERM_BITS for c in range(ti.shape[1])] for t in range(S)]
            g = (gains or {}).get(f"{layer}.{h}") or {}
            rec.update({
                "lens_rank_src": [None] + ls[1:].tolist(),
                "lens_rank_next": [None] + [int(v) if ok else None for v, ok in zip(ln[1:].tolist(), nxt_ok[1:])],
                "lens": [[]] + [[text[int(i)] for i, kp in zip(ti[t].tolist(), keep[t]) if kp] for t in range(1, S)],
                "lens_prob": [[]] + [[round(float(p), 4) for p, kp in zip(tp[t].tolist(), keep[t]) if kp]
                                     for t in range(1, S)],
                "lens_term": None if tt is None else [[]] + [[round(float(x), 4) for x, kp in zip(tt[t].tolist(), keep[t])
                                                              if kp] for t in range(1, S)],
                "gain": g.get("gain"), "informative": bool(g.get("informative")) if g else None})
        out[f"{layer}.{h}"] = rec
    return out
