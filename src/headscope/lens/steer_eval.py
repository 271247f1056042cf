"""``lens.steer_eval``: does adding a token's direction to one head's output steer the model, beyond a
random direction of the same norm, and at what cost compared with steering the residual stream?

For target tokens t (concrete nouns, single tokens with a leading space) × success prompts × heads (L, h)
× strengths, four directions are added at every position of the prompt (and of the continuation):

* ``unembed``: the token's unembedding row W_U[t], as a head edit (norm = strength × the head's mean
  output norm ‖r_h‖ on the prompts, positions ≥ 1);
* ``lens``: the direction the head's lens reads as t (:meth:`LensBank.direction`), same norm;
* ``random``: a Gaussian direction (seeded per head and token), same norm — the control;
* ``resid``: W_U[t] added to the residual stream at the same point, with the usual activation-addition
  scale (norm = strength × the residual stream's mean norm entering layer L). In a transformer whose
  attention output is added to the residual stream (every family headscope reads), adding a constant
  vector to one head's output *is* adding it to the residual stream after layer L's attention: the head
  edits differ from this reference only by their direction and their (smaller) norm. The comparison is
  therefore made at matched cost: the lens direction's success against the reference curve (the residual
points and the unembed head points, all W_U[t] added after layer L's attention at different norms)
interpolated at the lens edit's KL cost.

Success, per target token (averaged over the success prompts): Δ log₂ p(t) at the next position (the
last prompt position; steered − clean, bits) and the rate of t among the next ``new_tokens`` greedy
tokens. Cost: KL(clean ‖ steered) of the next-token distribution in bits, averaged over every position
≥ 1 of unrelated prompts (other documents), and the perplexity of the steered continuation under the clean
model. Every mean comes with a 95 % CI over target tokens (the independent unit: a token's vector is
shared by all its prompts). A head *steers* when its edit beats the random direction at a strength: the paired
difference (by token) is positive and its two-sided t test (df = tokens − 1; two-sided so that a pass
is exactly a 95 % CI above zero when there is one test) survives Benjamini–Hochberg at q = 0.05 over
every (head, direction, strength) test.

Writes ``RUN/lens/steer_eval.json``; returns :class:`SteerEvalResult`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from scipy import stats as _st

from ..capture import HeadIntervention, capture, run_with_interventions
from ..errors import HeadscopeError
from ..models.load import Model
from ..results import Result
from ..stats import benjamini_hochberg, one_sided_p
from .options import SteerEvalOptions

DIRECTIONS = ("unembed", "lens", "random", "resid")
HEAD_DIRECTIONS = ("unembed", "lens")
"""The head edits tested against the random control."""
Q = 0.05
LN2 = math.log(2)


@dataclass(frozen=True)
class SteerEvalResult(Result):
    """Summary of ``lens.steer_eval`` (the curves and tests are in ``lens/steer_eval.json``).

    ``per_head["L.H"]``: {"steers": passed for some direction/strength after BH, "best": the passing (or
    largest-effect) test row}; ``n_tests`` / ``n_pass``: the BH family and its discoveries."""

    heads: list
    tokens: list
    n_prompts: int
    n_cost_prompts: int
    strengths: list
    resid_strengths: list
    n_tests: int
    n_pass: int
    per_head: dict


# -- inputs ------------------------------------------------------------------------------------------------
def builtin_nouns() -> list[str]:
    """The built-in target words (concrete nouns, one per line in ``lens/data/nouns.txt``)."""
    text = resources.files("headscope.lens").joinpath("data/nouns.txt").read_text(encoding="utf-8")
    return [w.strip() for w in text.splitlines() if w.strip()]


def target_tokens(model: Model, words: list[str], n: int, seed: int) -> list[int]:
    """Up to ``n`` distinct token ids drawn (seeded) from the words whose ' word' spelling is one token."""
    ids = []
    for w in words:
        t = model.tokenizer(" " + w.strip(), add_special_tokens=False)["input_ids"]
        if len(t) == 1 and t[0] not in ids:
            ids.append(t[0])
    if len(ids) < 2:
        raise HeadscopeError(f"fewer than 2 of the {len(words)} target words are single tokens (with a leading space)")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(ids, size=min(n, len(ids)), replace=False).tolist())


def window_prompts(model: Model, corpus: str, prompt_len: int, n_success: int, n_cost: int,
                   seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Held-out windows ([BOS] + ``prompt_len`` tokens), one per document, in a seeded random order: the
    first ``n_success`` are the success prompts, the next ``n_cost`` (other documents) the cost prompts."""
    from ..data import TokenCorpus
    from ..sampling import Windows
    data = TokenCorpus(model, corpus, seq_len=prompt_len + 1, progress=False)
    win = Windows(data, "heldout", seed=seed)
    chosen, docs = [], set()
    for i in range(len(win)):
        d = int(win.docs[i])
        if d in docs:
            continue
        docs.add(d)
        chosen.append(win.ids(i, i + 1)[0])
        if len(chosen) == n_success + n_cost:
            break
    if len(chosen) < n_success + n_cost:
        raise HeadscopeError(f"the held-out split of corpus '{corpus}' has {len(chosen)} documents with a window of "
                             f"{prompt_len} tokens, fewer than the {n_success + n_cost} prompts asked for")
    return chosen[:n_success], chosen[n_success:]


def _groups(prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Prompts [S_i] grouped into [P_g, S_g] batches of equal length (no padding anywhere)."""
    by_len: dict[int, list[torch.Tensor]] = {}
    for p in prompts:
        by_len.setdefault(int(p.shape[0]), []).append(p)
    return [torch.stack(v) for _, v in sorted(by_len.items())]


# -- directions and scales ----------------------------------------------------------------------------------
def unit_directions(model: Model, layer: int, head: int, tokens: list[int], kind: str, bank=None,
                    seed: int = 0) -> torch.Tensor | None:
    """Unit vectors [T, d] per target token for direction ``kind`` (None: no lens for this head)."""
    W_U = model.W_U.detach().float()
    if kind in ("unembed", "resid"):
        D = W_U[tokens]
    elif kind == "lens":
        if bank is None or (layer, head) not in bank.sites:
            return None
        i = bank.sites.index((layer, head))
        D = torch.stack([bank.direction(i, t).float().to(W_U.device) for t in tokens])
    elif kind == "random":
        g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 1009 + head)
        D = torch.randn(len(tokens), W_U.shape[1], generator=g).to(W_U.device)
    else:
        raise HeadscopeError(f"unknown direction '{kind}' (choose from {', '.join(DIRECTIONS)})")
    return D / D.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def mean_norms(model: Model, prompts: list[torch.Tensor], layer: int, head: int) -> tuple[float, float]:
    """(mean ‖r_h‖ of head (layer, head), mean ‖resid_pre[layer]‖) over positions ≥ 1 of ``prompts``."""
    hn, rn, n = 0.0, 0.0, 0
    for ids in _groups(prompts):
        cap = capture(model, ids, layers=[layer], what=("result", "resid_pre"), stop_after=layer,
                      reduce={"result": lambda l, r: r[:, :, [head]].float()})
        r = cap["result"][layer][:, 1:, 0]
        x = cap["resid_pre"][layer][:, 1:].float()
        hn += float(r.norm(dim=-1).sum())
        rn += float(x.norm(dim=-1).sum())
        n += r.shape[0] * r.shape[1]
    return hn / n, rn / n


# -- one measurement -----------------------------------------------------------------------------------------
def _add(layer: int, head: int, vec: torch.Tensor | None, model: Model) -> list:
    """The edit adding vec [B, 1, d] (one vector per batch row) to head (layer, head)'s output."""
    if vec is None:
        return []
    return [HeadIntervention(layer=layer, heads=[head], kind="add", value=vec.to(model.dtype))]


@torch.no_grad()
def greedy(model: Model, ids: torch.Tensor, n: int, ivs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(first-step log-probs [B, V] at the last prompt position, continuation [B, n]) under ``ivs``."""
    out, first = ids, None
    for step in range(n):
        logits = run_with_interventions(model, out, ivs)[:, -1].float()
        if step == 0:
            first = torch.log_softmax(logits, -1)
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], 1)
    return first, out[:, ids.shape[1]:]


@torch.no_grad()
def continuation_bits(model: Model, ids: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
    """Mean −log₂ p_clean of each row's continuation cont [B, n] after ids [B, S]: [B]."""
    full = torch.cat([ids, cont], 1)
    lp = torch.log_softmax(run_with_interventions(model, full, []).float(), -1)
    S = ids.shape[1]
    got = lp[:, S - 1:-1].gather(-1, cont.unsqueeze(-1)).squeeze(-1)  # [B, n]
    return -got.mean(-1) / LN2


@torch.no_grad()
def measure(model: Model, success: list[torch.Tensor], cost: list[torch.Tensor], tokens: list[int],
            layer: int, head: int, vectors: torch.Tensor | None, new_tokens: int) -> dict[str, np.ndarray]:
    """Per target token [T]: mean over the success prompts of log₂ p(t) at the next position (``logp``),
    the rate of t in the continuation (``rate``), the continuation's −log₂ p under the clean model
    (``bits``), and KL(clean ‖ steered) in bits over positions ≥ 1 of the cost prompts (``kl``).
    ``vectors`` [T, d] (None: the clean model) is added to head (layer, head)'s output."""
    T = len(tokens)
    tok = torch.tensor(tokens, device=model.device)
    logp, rate, bits, n_s = torch.zeros(T), torch.zeros(T), torch.zeros(T), 0
    for ids in _groups(success):
        P = ids.shape[0]
        rows = ids.repeat(T, 1).to(model.device)                                   # [T·P, S]: token-major
        vec = vectors.repeat_interleave(P, 0)[:, None] if vectors is not None else None
        first, cont = greedy(model, rows, new_tokens, _add(layer, head, vec, model))
        t_rows = tok.repeat_interleave(P)
        lp = first.gather(-1, t_rows[:, None]).squeeze(-1) / LN2
        hit = (cont == t_rows[:, None]).float().mean(-1)
        b = continuation_bits(model, rows, cont)
        logp += lp.reshape(T, P).sum(1).cpu()
        rate += hit.reshape(T, P).sum(1).cpu()
        bits += b.reshape(T, P).sum(1).cpu()
        n_s += P
    kl, n_c = torch.zeros(T), 0
    if vectors is not None:
        for ids in _groups(cost):
            P = ids.shape[0]
            ids = ids.to(model.device)
            clean = torch.log_softmax(run_with_interventions(model, ids, []).float()[:, 1:], -1)   # [P, S−1, V]
            rows = ids.repeat(T, 1)
            vec = vectors.repeat_interleave(P, 0)[:, None]
            steered = torch.log_softmax(run_with_interventions(model, rows, _add(layer, head, vec, model))
                                        .float()[:, 1:], -1)                                       # [T·P, S−1, V]
            c = clean.repeat(T, 1, 1)
            k = (c.exp() * (c - steered)).sum(-1).mean(-1) / LN2                                    # [T·P]
            kl += k.reshape(T, P).sum(1).cpu()
            n_c += P
        kl /= n_c
    return {"logp": (logp / n_s).numpy(), "rate": (rate / n_s).numpy(), "bits": (bits / n_s).numpy(),
            "kl": kl.numpy()}


# -- statistics ------------------------------------------------------------------------------------------------
def mean_ci(x: np.ndarray) -> tuple[float, list[float]]:
    """Mean over tokens and its 95 % t interval (tokens are the independent unit)."""
    x = np.asarray(x, dtype=np.float64)
    m = float(x.mean())
    if len(x) < 2:
        return m, [m, m]
    h = float(_st.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, [m - h, m + h]


def _f(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def point(m: dict[str, np.ndarray], clean: dict[str, np.ndarray], strength: float, norm: float) -> dict:
    """One point of a success-vs-cost curve: means and CIs over tokens."""
    d, dci = mean_ci(m["logp"] - clean["logp"])
    r, rci = mean_ci(m["rate"])
    k, kci = mean_ci(m["kl"])
    ppl = float(2 ** m["bits"].mean())
    return {"strength": strength, "norm": norm, "dlogp": d, "dlogp_ci": dci, "rate": r, "rate_ci": rci,
            "kl": k, "kl_ci": kci, "ppl": ppl}


def matched_reference(curve: list[dict], kl: float) -> float | None:
    """The reference's Δ log₂ p interpolated at cost ``kl`` along its curve (from the clean point (0, 0));
    None beyond the reference's largest measured cost."""
    pts = sorted([(0.0, 0.0)] + [(p["kl"], p["dlogp"]) for p in curve])
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    if kl > xs[-1]:
        return None
    return float(np.interp(kl, xs, ys))


def control_tests(per_token: dict, curves: dict, strengths: list[float]) -> list[dict]:
    """Every (head, direction ∈ HEAD_DIRECTIONS, strength) against the random direction at the same
    strength, paired by token: Δ log₂ p difference, its CI, one-sided p and BH over all rows."""
    rows = []
    for head, dirs in per_token.items():
        for d in HEAD_DIRECTIONS:
            if dirs.get(d) is None:
                continue
            for i, s in enumerate(strengths):
                diff = np.asarray(dirs[d][i]["logp"]) - np.asarray(dirs["random"][i]["logp"])
                m, ci = mean_ci(diff)
                se = float(np.std(diff, ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
                p1 = float(one_sided_p(m, se, len(diff) - 1))
                p = 2 * min(p1, 1 - p1)  # two-sided: agrees with the 95 % CI shown beside it
                pt = curves[head][d][i]
                # the unembed head edit is itself a residual-stream edit (W_U[t] after layer L's attention):
                # it joins the reference curve and is not compared with it
                ref = None if d == "unembed" else matched_reference(curves[head]["resid"] + curves[head]["unembed"],
                                                                      pt["kl"])
                rows.append({"head": head, "direction": d, "strength": s, "dlogp": pt["dlogp"],
                             "dlogp_random": curves[head]["random"][i]["dlogp"], "diff": m, "diff_ci": ci,
                             "p_value": _f(p), "kl": pt["kl"], "resid_dlogp_at_same_kl": ref,
                             "vs_resid": None if ref is None else pt["dlogp"] - ref})
    bh = benjamini_hochberg([r["p_value"] if r["p_value"] is not None else np.nan for r in rows], Q)
    for r, b in zip(rows, bh):
        r["passes"] = bool(b and r["diff"] > 0)
    return rows


# -- the stage -------------------------------------------------------------------------------------------------
def choose_heads(model: Model, run, opts: SteerEvalOptions, bank) -> list[tuple[int, int]]:
    """--heads, or the informative heads of ``lens/eval.json`` with the largest gain (at most max_heads)."""
    from ..runs import read_json
    from ..sites import parse_sites
    from .verdict import from_eval
    if opts.heads:
        return parse_sites(opts.heads, model)
    p = run / "lens" / "eval.json"
    if not p.exists():
        raise HeadscopeError("no lens/eval.json in the run: run `headscope lens eval` first or give --heads")
    ev = read_json(p)
    flags = from_eval(ev) or {}
    names = sorted((n for n in ev["per_head"] if flags.get(n)), key=lambda n: -ev["per_head"][n]["gain"])
    if not names:
        raise HeadscopeError("lens eval found no informative head: give the heads to steer with --heads")
    return [tuple(int(x) for x in n.split(".")) for n in names[:opts.max_heads]]


def _read_lines(path: str, what: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise HeadscopeError(f"{what} file not found: {path}")
    lines = [l.strip() for l in p.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()]
    if not lines:
        raise HeadscopeError(f"{what} file {path} is empty")
    return lines


def steer_eval(model: Model, success: list[torch.Tensor], cost: list[torch.Tensor], tokens: list[int],
               sites: list[tuple[int, int]], strengths: list[float], resid_strengths: list[float],
               new_tokens: int = 4, bank=None, seed: int = 0, progress: bool = False) -> dict:
    """The measurement on given prompts (token ids [S_i], BOS first) and target token ids; see the module
    docstring. Returns {"clean", "curves": {"L.H": {direction: [point per strength]}}, "tests",
    "per_token": {"L.H": {direction: [{"logp", "kl", …} per strength]}} (lists)}."""
    from tqdm import tqdm
    for l, h in sites:
        model.check_layer(l), model.check_head(h)
    clean = measure(model, success, cost, tokens, 0, 0, None, new_tokens)
    curves, per_token = {}, {}
    bar = tqdm(total=len(sites) * (3 * len(strengths) + len(resid_strengths)), desc="lens steer-eval",
               disable=not progress)
    for l, h in sites:
        name = f"{l}.{h}"
        head_norm, resid_norm = mean_norms(model, success + cost, l, h)
        curves[name], per_token[name] = {}, {}
        for d in DIRECTIONS:
            D = unit_directions(model, l, h, tokens, d, bank, seed)
            if D is None:
                curves[name][d] = per_token[name][d] = None
                continue
            scale, ss = (resid_norm, resid_strengths) if d == "resid" else (head_norm, strengths)
            curves[name][d], per_token[name][d] = [], []
            for s in ss:
                m = measure(model, success, cost, tokens, l, h, D * (s * scale), new_tokens)
                curves[name][d].append(point(m, clean, s, s * scale))
                per_token[name][d].append(m)
                bar.update(1)
    bar.close()
    tests = control_tests(per_token, curves, strengths)
    lists = {n: {d: None if v is None else [{k: x.tolist() for k, x in m.items()} for m in v]
                 for d, v in dirs.items()} for n, dirs in per_token.items()}
    r0, _ = mean_ci(clean["rate"])
    return {"clean": {"logp": clean["logp"].tolist(), "rate": r0, "ppl": float(2 ** clean["bits"].mean())},
            "curves": curves, "tests": tests, "per_token": lists, "q": Q}


def stage_steer_eval(model: Model, run, opts: SteerEvalOptions, progress: bool = True) -> SteerEvalResult:
    """lens.steer_eval: steering through the chosen heads against the random and residual-stream references."""
    from ..runs import write_json
    from .lenses import load_bank
    bank, info = load_bank(model, run / "lens")
    sites = choose_heads(model, run, opts, bank)
    words = _read_lines(opts.tokens, "target token") if opts.tokens else builtin_nouns()
    tokens = target_tokens(model, words, opts.n_tokens, opts.seed)
    if opts.prompts:
        lines = _read_lines(opts.prompts, "prompts")
        need = opts.n_prompts + opts.n_cost_prompts
        if len(lines) < need:
            raise HeadscopeError(f"--prompts {opts.prompts} has {len(lines)} prompts; --n-prompts + --n-cost-prompts "
                                 f"need {need}")
        ids = [model.to_tokens(p)[0].cpu() for p in lines[:need]]
        if any(len(i) < 2 for i in ids):
            raise HeadscopeError("a prompt is empty after tokenization")
        success, cost = ids[:opts.n_prompts], ids[opts.n_prompts:]
    else:
        corpus = info.get("train", {}).get("corpus", "default")
        success, cost = window_prompts(model, corpus, opts.prompt_len, opts.n_prompts, opts.n_cost_prompts, opts.seed)
    out = steer_eval(model, success, cost, tokens, sites, list(opts.strengths), list(opts.resid_strengths),
                     opts.new_tokens, bank=bank, seed=opts.seed, progress=progress)
    out.update({"tokens": model.token_str(tokens), "token_ids": tokens, "heads": [f"{l}.{h}" for l, h in sites],
                "n_prompts": len(success), "n_cost_prompts": len(cost), "new_tokens": opts.new_tokens,
                "strengths": list(opts.strengths), "resid_strengths": list(opts.resid_strengths),
                "prompts": [model.tokenizer.decode(p[1:].tolist()) for p in success]})
    write_json(run / "lens" / "steer_eval.json", out)
    return summarize(out)


def summarize(out: dict) -> SteerEvalResult:
    """The stage's typed result from ``steer_eval.json``'s dict."""
    per_head = {}
    for name in out["heads"]:
        rows = [r for r in out["tests"] if r["head"] == name]
        passing = [r for r in rows if r["passes"]]
        best = max(passing or rows, key=lambda r: r["diff"]) if rows else None
        per_head[name] = {"steers": bool(passing), "best": best,
                          "directions_passed": sorted({r["direction"] for r in passing})}
    return SteerEvalResult(heads=out["heads"], tokens=out["tokens"], n_prompts=out["n_prompts"],
                           n_cost_prompts=out["n_cost_prompts"], strengths=out["strengths"],
                           resid_strengths=out["resid_strengths"], n_tests=len(out["tests"]),
                           n_pass=sum(r["passes"] for r in out["tests"]), per_head=per_head)


def format_table(out: dict) -> str:
    """Plain-text table of ``steer_eval.json``: one row per head, direction and strength."""
    lines = [f"{len(out['tokens'])} target tokens × {out['n_prompts']} prompts; cost on {out['n_cost_prompts']} "
             f"unrelated prompts; Δ log2 p of the target at the next position (bits), 95 % CI over tokens; "
             f"clean continuation perplexity {out['clean']['ppl']:.1f}",
             f"{'head':>6} {'direction':>9} {'×norm':>6} {'Δlog2p':>7} {'95% CI':>16} {'rate':>5} {'KL bits':>8} "
             f"{'ppl':>7}  vs random / vs resid at same KL"]
    tests = {(r["head"], r["direction"], r["strength"]): r for r in out["tests"]}
    for name, dirs in out["curves"].items():
        for d, pts in dirs.items():
            if pts is None:
                continue
            for p in pts:
                t = tests.get((name, d, p["strength"]))
                note = ""
                if t:
                    note = (f"{t['diff']:+.2f} ({'beats the control' if t['passes'] else 'does not beat the control'})"
                            + (" / same edit" if d == "unembed" else f" / {t['vs_resid']:+.2f}"
                               if t["vs_resid"] is not None else " / beyond resid range"))
                lines.append(f"{name:>6} {d:>9} {p['strength']:6.2f} {p['dlogp']:+7.2f} "
                             f"[{p['dlogp_ci'][0]:+6.2f}, {p['dlogp_ci'][1]:+6.2f}] {p['rate']:5.2f} {p['kl']:8.3f} "
                             f"{p['ppl']:7.1f}  {note}")
    return "\n".join(lines)


def report_steer_eval(summary, opts: SteerEvalOptions, run) -> None:
    from ..runs import read_json
    out = read_json(run / "lens" / "steer_eval.json")
    print(format_table(out))
    n = sum(r["passes"] for r in out["tests"])
    print(f"{n}/{len(out['tests'])} head edits beat the random direction (paired by token, two-sided, BH q = {out['q']})")
    print(f"→ {run / 'lens' / 'steer_eval.json'}")
