"""The prompt-set classifier of ``lens scan --contrast``, measured honestly (Attention Lens paper, arXiv
2310.16270, §"detecting malicious prompts").

Two prompt sets are separated by an L2 logistic regression on per-head statistics of the listed tokens
(per head: the fraction of positions ≥ 1 where a listed token is in the reader's top-k, and the mean
log-probability mass of the list), and scored **out of fold**: stratified k-fold cross-validation by
prompt, with whole *sources* held out together when the prompt files declare them (a line
``# source: NAME`` labels the prompts below it, so paraphrases of one template never sit on both sides of
a split). The held-out AUROC of the pooled out-of-fold scores gets a 95 % CI from a bootstrap over
sources (over prompts when none are declared). The same cross-validation runs on the same prompts for
three baselines, each a 95 % CI on its difference to the lens (paired bootstrap):

* ``bag_of_words``: token presence counts of the prompt (no model at all);
* ``unembed``: the same head statistics read through the unembedding W_U·N(r_h) instead of the lens;
* ``random_heads``: the lens applied to random head outputs (each position's r_h replaced by a Gaussian
  vector of the same norm): what the pipeline gives when the heads carry no content.

The lens classifier is interesting only where its AUROC beats every baseline (difference CI above 0).
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from scipy import stats as _st

from ..errors import HeadscopeError
from ..models.load import Model
from .collect import site_batch
from .evaluate import baseline_logits

FOLDS = 5
"""Cross-validation folds (fewer when there are fewer sources)."""
READERS = ("lens", "unembed", "random_heads")
BASELINES = ("bag_of_words", "unembed", "random_heads")
SITE_CHUNK = 16
"""Heads read per block (keeps the [K, S, V] log-probabilities small)."""
BUILTIN = ("injection", "ordinary", "injection_words")
"""Prompt sets shipped in ``lens/data`` (``builtin:NAME`` in place of a file)."""


# -- prompt files ----------------------------------------------------------------------------------------------

def fit_logistic(X: torch.Tensor, y: torch.Tensor, l2: float = 1e-2, iters: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression on standardised X [n, f], y ∈ {0,1} [n] (L-BFGS). Returns
    (w [f], b) for the standardised features."""
    X, y = X.double(), y.double()
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = X @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def read_prompt_file(path: str, what: str = "prompts") -> tuple[list[str], list[str | None]]:
    """Prompts and their sources from a file (or ``builtin:NAME``): one prompt per line; ``# source: NAME``
    sets the source of the prompts below it; other lines starting with ``#`` and blank lines are skipped."""
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name not in BUILTIN:
            raise HeadscopeError(f"unknown built-in set '{name}' (choose from {', '.join(BUILTIN)})")
        text = resources.files("headscope.lens").joinpath(f"data/{name}.txt").read_text(encoding="utf-8")
    else:
        p = Path(path)
        if not p.is_file():
            raise HeadscopeError(f"{what} file not found: {path}")
        text = p.read_text(encoding="utf-8", errors="replace")
        if "\0" in text:
            raise HeadscopeError(f"{what} file {path} contains NUL bytes: not a text file")
    prompts, sources, src = [], [], None
    for line in text.splitlines():
        s = line.strip()
        if s.lower().startswith("# source:"):
            src = s.split(":", 1)[1].strip() or None
        elif s and not s.startswith("#"):
            prompts.append(s)
            sources.append(src)
    if not prompts:
        raise HeadscopeError(f"{what} file {path} is empty")
    return prompts, sources


# -- features -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def reader_features(model: Model, bank, prompts: list[str], token_ids: list[int], k: int = 10,
                    reader: str = "lens", seed: int = 0) -> torch.Tensor:
    """Per prompt [P, 2K]: per head (bank.sites order) the fraction of positions ≥ 1 whose top-k by
    probability holds a listed token, then the mean log Σ_{t∈list} q(t); q read by ``reader``."""
    if reader not in READERS:
        raise HeadscopeError(f"unknown reader '{reader}' (choose from {', '.join(READERS)})")
    tok = torch.tensor(token_ids, device=model.device)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for p in prompts:
        ids = model.to_tokens(p)
        if ids.shape[1] < 2:
            raise HeadscopeError(f"prompt {p!r} is a single token: nothing to read after BOS")
        R, _ = site_batch(model, ids, bank.sites, logprobs=False)
        R = R[:, 1:]                                                                   # [K, S−1, d]: BOS left out
        if reader == "random_heads":
            noise = torch.randn(R.shape, generator=g).to(R.device)
            R = noise / noise.norm(dim=-1, keepdim=True) * R.norm(dim=-1, keepdim=True)
        hit, mass = [], []
        for a in range(0, R.shape[0], SITE_CHUNK):
            b = min(a + SITE_CHUNK, R.shape[0])
            if reader == "unembed":
                lg = baseline_logits(model, R[a:b])
            else:
                lg = bank(R[a:b], lenses=bank.lens_index[a:b].to(R.device))
            logq = torch.log_softmax(lg.float(), -1)                                   # [k, S−1, V]
            top = logq.topk(min(k, logq.shape[-1]), -1).indices
            hit.append(torch.isin(top, tok).any(-1).float().mean(-1))
            mass.append(torch.logsumexp(logq[..., tok], -1).mean(-1))
        rows.append(torch.cat([torch.cat(hit), torch.cat(mass)]).cpu())
    return torch.stack(rows)


def bag_of_words(model: Model, prompts: list[str]) -> torch.Tensor:
    """Token counts [P, U] over the U distinct tokens of the prompts (no model forward pass)."""
    toks = [model.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    vocab = sorted({t for ts in toks for t in ts})
    col = {t: i for i, t in enumerate(vocab)}
    X = torch.zeros(len(prompts), len(vocab))
    for i, ts in enumerate(toks):
        for t in ts:
            X[i, col[t]] += 1
    return X


# -- cross-validation and AUROC -------------------------------------------------------------------------------
def auroc(scores, y) -> float:
    """Area under the ROC curve (Mann–Whitney, ties counted half): P(score of a 1 > score of a 0)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(y)
    n1, n0 = int((y == 1).sum()), int((y == 0).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = _st.rankdata(s)
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def folds_of(y: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per prompt: whole groups per fold, groups dealt round-robin in a seeded order within
    each majority class (so both classes reach every fold when groups are single prompts)."""
    rng = np.random.default_rng(seed)
    uniq = np.unique(groups)
    n_folds = min(n_folds, len(uniq))
    if n_folds < 2:
        raise HeadscopeError("the classifier needs at least 2 sources (or prompts) to hold one out")
    major = {g: int(round(y[groups == g].mean())) for g in uniq}
    order = [g for c in (1, 0) for g in rng.permutation([g for g in uniq if major[g] == c])]
    fold_of = {g: i % n_folds for i, g in enumerate(order)}
    return np.array([fold_of[g] for g in groups])


def oof_scores(X: torch.Tensor, y: np.ndarray, folds: np.ndarray, l2: float = 1e-2) -> np.ndarray:
    """Out-of-fold logistic-regression scores [n] (features standardised on each training fold)."""
    s = np.zeros(len(y))
    yt = torch.tensor(y, dtype=torch.float64)
    for f in np.unique(folds):
        tr, te = np.where(folds != f)[0], np.where(folds == f)[0]
        if len(np.unique(y[tr])) < 2:
            raise HeadscopeError("a cross-validation fold left one class out of training: give more prompts or "
                                 "sources in each set")
        Xtr = X[tr].double()
        mu, sd = Xtr.mean(0), Xtr.std(0).clamp_min(1e-6)
        w, b = fit_logistic((Xtr - mu) / sd, yt[tr], l2=l2)
        s[te] = (((X[te].double() - mu) / sd) @ w + b).numpy()
    return s


def bootstrap_auroc(scores: dict[str, np.ndarray], y: np.ndarray, groups: np.ndarray, reps: int = 1000,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """AUROC replicates [reps] per classifier, resampling groups (sources or prompts) with replacement;
    the same draws for every classifier, so differences are paired."""
    rng = np.random.default_rng(seed)
    uniq = np.unique(groups)
    members = [np.where(groups == g)[0] for g in uniq]
    out = {n: [] for n in scores}
    for _ in range(reps):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(uniq), len(uniq))])
        if len(np.unique(y[idx])) < 2:
            continue
        for n, s in scores.items():
            out[n].append(auroc(s[idx], y[idx]))
    return {n: np.array(v) for n, v in out.items()}


def _ci(v: np.ndarray) -> list[float] | None:
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else None


def compare(features: dict[str, torch.Tensor], y, sources: list[str | None] | None = None, n_folds: int = FOLDS,
            seed: int = 0, reps: int = 1000) -> dict:
    """Held-out AUROC with a 95 % CI for each feature set (``features["lens"]`` first, then baselines) under
    the same folds, and for each baseline the paired CI of (lens − baseline). Returns {"auroc": {name:
    {"auroc", "ci"}}, "vs_lens": {name: {"diff", "ci", "lens_better"}}, "n", "n_groups", "folds",
    "grouped_by"}."""
    y = np.asarray(y, dtype=np.int64)
    n = len(y)
    if n < 4 or y.min() == y.max() or min((y == 1).sum(), (y == 0).sum()) < 2:
        raise HeadscopeError("the classifier needs at least 2 prompts in each set")
    by_source = sources is not None and all(s is not None for s in sources)
    groups = np.array(sources if by_source else [f"prompt{i}" for i in range(n)])
    folds = folds_of(y, groups, n_folds, seed)
    scores = {name: oof_scores(X, y, folds) for name, X in features.items()}
    boot = bootstrap_auroc(scores, y, groups, reps, seed)
    out = {"n": n, "n_groups": int(len(np.unique(groups))), "folds": int(folds.max()) + 1,
           "grouped_by": "source" if by_source else "prompt", "auroc": {}, "vs_lens": {}}
    for name, s in scores.items():
        out["auroc"][name] = {"auroc": auroc(s, y), "ci": _ci(boot[name])}
    if "lens" in scores:
        for name in scores:
            if name == "lens":
                continue
            d = boot["lens"] - boot[name]
            ci = _ci(d)
            out["vs_lens"][name] = {"diff": out["auroc"]["lens"]["auroc"] - out["auroc"][name]["auroc"], "ci": ci,
                                    "lens_better": bool(ci is not None and ci[0] > 0)}
    return out


def contrast_report(model: Model, bank, prompts: list[str], contrast: list[str], token_ids: list[int], k: int,
                    sources: list[str | None] | None = None, seed: int = 0, reps: int = 1000) -> dict:
    """The lens classifier and its three baselines on ``prompts`` (label 1) vs ``contrast`` (label 0)."""
    allp = prompts + contrast
    y = np.array([1] * len(prompts) + [0] * len(contrast))
    feats = {r: reader_features(model, bank, allp, token_ids, k, r, seed) for r in READERS}
    feats["bag_of_words"] = bag_of_words(model, allp)
    res = compare({"lens": feats["lens"], **{b: feats[b] for b in BASELINES}}, y, sources, seed=seed, reps=reps)
    a = res["auroc"]["lens"]
    res["beats_baselines"] = all(v["lens_better"] for v in res["vs_lens"].values())
    res["verdict"] = ("the lens classifier beats every baseline" if res["beats_baselines"] else
                      "the lens classifier does not beat " +
                      ", ".join(n for n, v in res["vs_lens"].items() if not v["lens_better"]))
    res["lens_auroc"] = a["auroc"]
    return res


def format_contrast(res: dict) -> str:
    lines = [f"classifier (held-out AUROC, {res['folds']}-fold CV by {res['grouped_by']}, {res['n']} prompts, 95 % "
             f"CI over {res['n_groups']} {res['grouped_by']}s):"]
    for name, v in res["auroc"].items():
        ci = v["ci"] or [math.nan, math.nan]
        extra = ""
        if name in res["vs_lens"]:
            d = res["vs_lens"][name]
            dci = d["ci"] or [math.nan, math.nan]
            extra = f"   lens − this {d['diff']:+.2f} [{dci[0]:+.2f}, {dci[1]:+.2f}]"
        lines.append(f"  {name:>13} {v['auroc']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]{extra}")
    lines.append(f"  → {res['verdict']}")
    return "\n".join(lines)
