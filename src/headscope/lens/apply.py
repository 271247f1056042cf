"""Applying trained lenses: read heads on a prompt (show), localise token sets (scan), separate two
prompt sets (classifier) and steer generation (steer).

Every reading is gated by the one informative rule (verdict.py: one-sided test of the held-out gain,
Benjamini–Hochberg over heads) applied to ``eval.json``: a head that is not informative reads nothing
beyond base rates, and its tokens are not presented as meaningful. What a lens "says" at a position is
ranked by default by each token's term q·log(q/q_null) of KL(lens ‖ null): a token needs both
probability under the lens and lift over the null; tokens whose term is not above ``MIN_TERM_BITS``
are not shown. Position 0 (BOS: the same context in every prompt) is never read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..capture import HeadIntervention, run_with_interventions
from ..errors import HeadscopeError
from ..models.load import Model
from ..runs import read_json
from .collect import site_batch
from .evaluate import baseline_logits
from .lenses import LensBank

MULTI_TOKEN = ("first", "skip")
RANKINGS = ("kl", "prob", "lift")
MIN_TERM_BITS = 1e-3
"""A token's KL term must exceed this (bits) to be shown under the default ``kl`` ranking."""


def kl_terms(logq: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """Per-token terms q·(log q − log q_null) of KL(lens ‖ null), in bits: logq [..., V], null logits [V]."""
    log_null = torch.log_softmax(null.to(logq.device).float(), -1)
    return logq.exp() * (logq - log_null) / math.log(2)


def load_gains(lens_folder: Path) -> dict[str, dict] | None:
    """Per-head eval metrics from ``eval.json`` with ``informative`` decided by the one rule
    (verdict.from_eval); None when the lenses were never evaluated."""
    from .verdict import from_eval
    p = Path(lens_folder) / "eval.json"
    if not p.exists():
        return None
    ev = read_json(p)
    flags = from_eval(ev)
    return {n: {**v, "informative": flags[n]} for n, v in ev["per_head"].items()}


def select_sites(bank: LensBank, sites: list[tuple[int, int]] | None) -> list[int]:
    """Indices into ``bank.sites`` for ``sites`` (all when None); a head without a lens is an error."""
    if sites is None:
        return list(range(len(bank.sites)))
    missing = [f"{l}.{h}" for l, h in sites if (l, h) not in bank.sites]
    if missing:
        raise HeadscopeError(f"no lens trained for head(s) {', '.join(missing)}; trained: "
                             f"{', '.join(f'{l}.{h}' for l, h in bank.sites[:12])}{' …' if len(bank.sites) > 12 else ''}")
    return [bank.sites.index(tuple(s)) for s in sites]


def _sub_logits(bank: LensBank, R: torch.Tensor, idx: list[int]) -> torch.Tensor:
    lenses = bank.lens_index[torch.tensor(idx, dtype=torch.long)]
    return bank(R, lenses=lenses.to(R.device))


# -- show ------------------------------------------------------------------------------------------------
@torch.no_grad()
def show(model: Model, bank: LensBank, prompt: str, sites: list[tuple[int, int]] | None = None, k: int = 5,
         gains: dict | None = None, null: torch.Tensor | None = None, by: str = "kl") -> dict:
    """Per position t ≥ 1, the top-k tokens of each selected head's lens and of its unembedding baseline.

    ``by="kl"`` (default) ranks by the token's term q·log(q/q_null) of KL(lens ‖ null) and keeps only
    terms above ``MIN_TERM_BITS`` (a lens that says what the null says shows nothing); ``by="prob"`` by
    lens probability; ``by="lift"`` by log q_lens − log q_null. ``gains`` from :func:`load_gains`.
    Returns {"tokens": [...], "by", "heads": {"L.H": {"gain", "informative", "positions": [{"t", "lens":
    [[tok, p, term_bits], ...], "unembed": [[tok, p], ...]}]}}}."""
    if by not in RANKINGS:
        raise HeadscopeError(f"unknown ranking '{by}' (choose from {', '.join(RANKINGS)})")
    if by in ("lift", "kl") and null is None:
        raise HeadscopeError(f"ranking by {by} needs the null lens (null.safetensors)")
    ids = model.to_tokens(prompt)
    idx = select_sites(bank, sites)
    chosen = [bank.sites[i] for i in idx]
    R, _ = site_batch(model, ids, chosen, logprobs=False)
    # top-k of every head at every position t >= 1 in batched calls (position 0, BOS, has the same context
    # in every prompt). log q = logits − logsumexp: the ranking by probability is the ranking by logit, so
    # the [K, S, V] log-softmax is formed only when the ranking needs every token's log q (kl, lift)
    lg = _sub_logits(bank, R, idx)[:, 1:]                                 # [K, S-1, V]
    lse = torch.logsumexp(lg, -1, keepdim=True)
    term = None
    if by == "prob":
        rank = lg
    else:
        logq = lg.sub_(lse)
        lse = torch.zeros_like(lse)                                       # lg now holds log q
        term = kl_terms(logq, null)
        rank = term if by == "kl" else logq - torch.log_softmax(null.to(logq.device).float(), -1)
    kk = min(k, rank.shape[-1])
    top_i = rank.topk(kk, -1).indices                                     # [K, S-1, k]
    lens_p = (lg.gather(-1, top_i) - lse).exp()
    lens_term = term.gather(-1, top_i) if term is not None else None
    del rank, term, lg
    bl = baseline_logits(model, R[:, 1:])                                 # [K, S-1, V]
    base = bl.topk(k, -1)
    base_p = (base.values - torch.logsumexp(bl, -1, keepdim=True)).exp()
    del bl
    out = {"tokens": model.token_str(ids[0]), "by": by, "heads": {}}
    # the token strings decoded once per distinct id
    ids_all = torch.cat([top_i.reshape(-1), base.indices.reshape(-1)]).unique().tolist()
    text = dict(zip(ids_all, model.token_str(ids_all)))
    top_l, lens_pl, base_l, base_pl = top_i.tolist(), lens_p.tolist(), base.indices.tolist(), base_p.tolist()
    term_l = lens_term.tolist() if lens_term is not None else None
    for j, (l, h) in enumerate(chosen):
        name = f"{l}.{h}"
        g = (gains or {}).get(name)
        info = {"gain": g["gain"] if g else None, "gain_se": g.get("gain_se") if g else None,
                "informative": bool(g and g.get("informative")), "positions": []}
        for t in range(1, R.shape[1]):
            row = [(text[i], p_, term_l[j][t - 1][c] if term_l is not None else None)
                   for c, (i, p_) in enumerate(zip(top_l[j][t - 1], lens_pl[j][t - 1]))]
            if by == "kl":
                row = [r for r in row if r[2] > MIN_TERM_BITS]
            info["positions"].append({
                "t": t, "lens": [list(r) for r in row],
                "unembed": [[text[i], p_] for i, p_ in zip(base_l[j][t - 1], base_pl[j][t - 1])]})
        out["heads"][name] = info
    return out


def format_show(res: dict, show_uninformative: bool = False) -> str:
    """Plain-text table of :func:`show`'s result."""
    lines = []
    for name, info in res["heads"].items():
        g = info["gain"]
        se = info.get("gain_se")
        head = f"head {name}: information gain " + ("unknown (run `headscope lens eval`)" if g is None else
                                                    f"{g:+.3f}" + (f" ± {se:.3f}" if se is not None else "") + " bits/token")
        lines.append(head)
        if g is not None and not info["informative"] and not show_uninformative:
            lines.append("  not informative (gain not significantly above zero, BH q = 0.05): this lens reads nothing "
                         "beyond base rates from this head; tokens not shown (--show-uninformative to print them anyway)")
            continue
        for pos in info["positions"]:
            t = pos["t"]
            lens = " ".join(f"{s!r}:{p:.2f}" for s, p, _ in pos["lens"]) or "(nothing beyond the null)"
            base = " ".join(f"{s!r}" for s, _ in pos["unembed"])
            lines.append(f"  {t:>3} {res['tokens'][t]!r:>14} | lens {lens} | unembed {base}")
    return "\n".join(lines)


# -- token lists and scan --------------------------------------------------------------------------------
def resolve_token_list(model: Model, words: list[str], multi: str = "first") -> tuple[list[int], dict]:
    """Token ids for ``words``. Each word counts as the single tokens among its spellings 'word' and
    ' word' (with a leading space, as inside a sentence). A word with no single-token spelling uses the
    first token of ' word' (``multi="first"``) or is skipped (``multi="skip"``); both are reported."""
    if multi not in MULTI_TOKEN:
        raise HeadscopeError(f"unknown multi-token policy '{multi}' (choose from {', '.join(MULTI_TOKEN)})")
    words = [w.strip("\n") for w in words if w.strip()]
    if not words:
        raise HeadscopeError("the token list is empty")
    ids: set[int] = set()
    report = {"multi_token": [], "skipped": [], "used_first_token": []}
    for w in words:
        single = []
        for spelling in (w, " " + w.lstrip()):
            t = model.tokenizer(spelling, add_special_tokens=False)["input_ids"]
            if len(t) == 1:
                single.append(t[0])
        if single:
            ids.update(single)
            continue
        report["multi_token"].append(w)
        if multi == "first":
            ids.add(model.tokenizer(" " + w.lstrip(), add_special_tokens=False)["input_ids"][0])
            report["used_first_token"].append(w)
        else:
            report["skipped"].append(w)
    if not ids:
        raise HeadscopeError(f"no word of the token list is a single token (multi-token: {', '.join(report['multi_token'][:10])}); "
                             "use --multi-token first")
    return sorted(ids), report


@torch.no_grad()
def prompt_hits(model: Model, bank: LensBank, prompts: list[str], lists: list[list[int]], k: int = 10,
                null: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token list, prompt and site: hit rate [L, P, K] (fraction of the prompt's positions t ≥ 1 where
    any token of the list is among the lens' top-k by KL term q·log(q/q_null) with a term above
    ``MIN_TERM_BITS``, or by probability when ``null`` is None) and log-mass [L, P, K] (mean over those
    positions of log Σ_{t∈list} q_lens(t)). One forward pass per prompt (no padding in the statistics)."""
    if not prompts:
        raise HeadscopeError("the prompt set is empty")
    toks = [torch.tensor(t, device=model.device) for t in lists]
    hits, mass = [], []
    for p in prompts:
        ids = model.to_tokens(p)[0]
        if ids.shape[0] < 2:
            raise HeadscopeError(f"prompt {p!r} is a single token: nothing to read after BOS")
        R, _ = site_batch(model, ids.unsqueeze(0), bank.sites, logprobs=False)
        logq = torch.log_softmax(bank(R[:, 1:]), -1)  # [K, S−1, V]: position 0 (BOS) left out
        if null is not None:
            term = kl_terms(logq, null)
            v, top = term.topk(min(k, logq.shape[-1]), -1)  # [K, S−1, k]
            ok = v > MIN_TERM_BITS
            del term
        else:
            top = logq.topk(min(k, logq.shape[-1]), -1).indices
            ok = torch.ones_like(top, dtype=torch.bool)
        hits.append(torch.stack([(torch.isin(top, t) & ok).any(-1).float().mean(-1).cpu() for t in toks]))
        mass.append(torch.stack([torch.logsumexp(logq[..., t], -1).mean(-1).cpu() for t in toks]))
    return torch.stack(hits, 1), torch.stack(mass, 1)


def prompt_features(model: Model, bank: LensBank, prompts: list[str], token_ids: list[int], k: int = 10,
                    batch_size: int = 8, null: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hit rate [P, K] and log-mass [P, K] of one token list (see :func:`prompt_hits`)."""
    h, m = prompt_hits(model, bank, prompts, [token_ids], k, null)
    return h[0], m[0]


def heatmap(model: Model, sites: list[tuple[int, int]], values: torch.Tensor) -> list[list[float | None]]:
    grid = [[None] * model.n_heads for _ in range(model.n_layers)]
    for (l, h), v in zip(sites, values.tolist()):
        grid[l][h] = v
    return grid


def scan(model: Model, bank: LensBank, words: list[str], prompts: list[str], k: int = 10, multi: str = "first",
         contrast: list[str] | None = None, gains: dict | None = None, seed: int = 0,
         null: torch.Tensor | None = None, freq=None, sources: list | None = None,
         contrast_sources: list | None = None, reps: int = 1000) -> dict:
    """How often each head's lens puts a listed token in its top-k (by KL term with ``null``, the
    default of the CLI) over ``prompts`` (layer×head heatmap of hit rates). With ``freq`` (token counts
    [V] of the corpus), the same rate for a frequency-matched control list and the per-head test against
    it (``localisation``, see :mod:`.localise`). With ``contrast``, the prompt-set classifier against its
    baselines (``classifier``, see :mod:`.classifier`; ``sources`` / ``contrast_sources`` group the
    prompts for cross-validation). ``gains`` from :func:`load_gains`: heads that are not informative are
    listed in ``uninformative_heads``."""
    from .classifier import contrast_report
    from .localise import localise, matched_controls
    token_ids, report = resolve_token_list(model, words, multi)
    names = [f"{l}.{h}" for l, h in bank.sites]
    lists = [token_ids]
    if freq is not None:
        control_ids = matched_controls(model, token_ids, freq, seed)
        lists.append(control_ids)
    H, _ = prompt_hits(model, bank, prompts, lists, k, null)
    rate = H[0].mean(0)
    out = {"k": k, "ranking": "kl" if null is not None else "prob", "tokens": model.token_str(token_ids), "token_ids": token_ids, "token_report": report,
           "n_prompts": len(prompts), "hit_rate": {n: float(r) for n, r in zip(names, rate)},
           "heatmap_hit_rate": heatmap(model, bank.sites, rate)}
    if freq is not None:
        loc = localise(H[0], H[1], names)
        loc["control_tokens"] = model.token_str(control_ids)
        loc["frequency"] = {"list_median": float(np.median(freq[token_ids])),
                            "control_median": float(np.median(freq[control_ids]))}
        out["localisation"] = loc
        out["heatmap_localised_diff"] = heatmap(model, bank.sites,
                                                torch.tensor([loc["per_head"][n]["diff"] for n in names]))
    if gains:
        out["uninformative_heads"] = [n for n in out["hit_rate"] if n in gains and not gains[n]["informative"]]
        if "localisation" in out:  # a lens that reads nothing localises nothing, whatever its rate
            for n in out["uninformative_heads"]:
                out["localisation"]["per_head"][n]["lens_informative"] = False
    if contrast is not None:
        srcs = None
        if sources is not None and contrast_sources is not None and all(s is not None for s in sources + contrast_sources):
            srcs = list(sources) + list(contrast_sources)
        out["classifier"] = contrast_report(model, bank, prompts, contrast, token_ids, k, srcs, seed=seed, reps=reps)
    return out


# -- a small logistic regression (no scikit-learn dependency) ---------------------------------------------
# -- steer -----------------------------------------------------------------------------------------------
@dataclass
class Steer:
    """One edit of a head: ``add`` a token direction (``token``; from the lens with ``from_lens``,
    else the token's unembedding row W_U[t]) scaled to ``alpha`` × the head's mean output norm on the
    prompt; or ``scale`` the head by ``alpha`` (``alpha=0`` ablates it)."""

    layer: int
    head: int
    kind: str = "add"
    token: str | None = None
    alpha: float = 1.0
    from_lens: bool = False


@torch.no_grad()
def generate(model: Model, ids: torch.Tensor, n: int, interventions=()) -> torch.Tensor:
    """Greedy continuation of ids [1, S] by ``n`` tokens (interventions at every position)."""
    for _ in range(n):
        logits = run_with_interventions(model, ids, interventions)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        if ids.shape[1] >= model.n_ctx:
            break
    return ids


def single_token(model: Model, word: str) -> int:
    for spelling in (word, " " + word.lstrip()):
        t = model.tokenizer(spelling, add_special_tokens=False)["input_ids"]
        if len(t) == 1:
            return t[0]
    raise HeadscopeError(f"'{word}' is not a single token (nor with a leading space); pick a single-token word")


@torch.no_grad()
def steer(model: Model, prompt: str, edits: list[Steer], n_tokens: int = 20, bank: LensBank | None = None) -> dict:
    """Generations before and after the edits, and each edit's resolved vector norm."""
    if not edits:
        raise HeadscopeError("no steering edit given")
    ids = model.to_tokens(prompt)
    ivs, described = [], []
    for e in edits:
        model.check_layer(e.layer), model.check_head(e.head)
        if e.kind == "scale":
            ivs.append(HeadIntervention(layer=e.layer, heads=[e.head], kind="scale", value=float(e.alpha)))
            described.append({"head": f"{e.layer}.{e.head}", "kind": "scale", "alpha": e.alpha})
            continue
        if e.kind != "add":
            raise HeadscopeError(f"unknown steering kind '{e.kind}' (choose add or scale)")
        if e.token is None:
            raise HeadscopeError("an 'add' edit needs a token")
        t = single_token(model, e.token)
        if e.from_lens:
            if bank is None:
                raise HeadscopeError("--from-lens needs trained lenses (--lenses RUN_DIR)")
            i = select_sites(bank, [(e.layer, e.head)])[0]
            direction = bank.direction(i, t).to(model.device)
        else:
            direction = model.W_U.detach()[t].float()
        R, _ = site_batch(model, ids, [(e.layer, e.head)], logprobs=False)
        scale = float(R[0].norm(dim=-1).mean())
        vec = direction / direction.norm().clamp_min(1e-12) * scale * e.alpha
        ivs.append(HeadIntervention(layer=e.layer, heads=[e.head], kind="add", value=vec.to(model.dtype)))
        described.append({"head": f"{e.layer}.{e.head}", "kind": "add", "token": model.token_str([t])[0],
                          "alpha": e.alpha, "from_lens": e.from_lens, "norm": float(vec.norm())})
    before = generate(model, ids, n_tokens)
    after = generate(model, ids, n_tokens, ivs)
    dec = model.tokenizer.decode
    S = ids.shape[1]
    return {"prompt": prompt, "edits": described, "before": dec(before[0, S:].tolist()),
            "after": dec(after[0, S:].tolist())}
