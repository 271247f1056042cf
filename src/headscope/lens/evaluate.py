"""Held-out evaluation of a bank of lenses against the unembedding baseline and the null lens.

Per site (layer ℓ, head h), on held-out tokens (bits/token; p = the model's final distribution):

* ``kl_lens``      KL(p ‖ lens(r_h))
* ``kl_unembed``   KL(p ‖ softmax(W_U·N(r_h) + b_U))   — the unembedding baseline (docs/design.md)
* ``kl_unembed_nonorm`` KL(p ‖ softmax(W_U·r_h + b_U))
* ``kl_null``      KL(p ‖ softmax(c0)), c0 = log mean p over training tokens (ignores the head)
* ``gain``         kl_null − kl_lens: what the lens reads out of this head beyond base rates, with
  ``gain_se`` its standard error over held-out sequences and ``informative`` = gain > 2·SE.
* ``top_tokens``   per site, the tokens with the largest mean lift log q_lens − log q_null over positions;
* ``improvement``  kl_unembed − kl_lens; ``top1`` agreement of the lens' argmax with p's;
  ``entropy`` of the lens (bits) and ``entropy_model``.

``run_eval`` writes ``run/lens/eval.json``; the cross-site transfer matrix (lens of site i applied to
site j's output: KL and gain) goes in the same file under ``transfer``. ``run_checkpoint_transfer``
applies the lenses to another checkpoint of the same architecture (``transfer_checkpoint.json``).
"""

from __future__ import annotations

import math
import sys

import torch

from ..data import TokenCorpus
from ..errors import HeadscopeError
from ..models.load import Model
from ..runs import RunDir, write_json
from .collect import site_batch
from .lenses import LensBank, load_bank, softcap
from .objectives import LN2
from .train import load_null

MAX_TRANSFER_SITES = 24


BLOCK_ELEMENTS = 100_000_000
"""Logit elements (sites × positions × V) held at once during evaluation (~400 MB of float32)."""


def _kl_lse(logits: torch.Tensor, p: torch.Tensor, neg_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p ‖ softmax(logits)) [k, n] as Σ p·log p − Σ p·logits + logsumexp(logits), and the
    logsumexp [k, n]: two passes over logits [k, n, V] instead of a log-softmax and a product.
    p [n, V] the model's probabilities, neg_h [n] = Σ p·log p."""
    lse = torch.logsumexp(logits, -1)
    return neg_h - torch.einsum("nv,knv->kn", p, logits) + lse, lse


def baseline_logits(model: Model, R: torch.Tensor, norm: bool = True) -> torch.Tensor:
    """Unembedding baseline logits [K, N, V]: φ(W_U·N(r) + b_U) (``norm=False``: φ(W_U·r + b_U)),
    φ the model's final-logit soft-capping where it has one."""
    x = model.final_norm(R.to(model.dtype)).float() if norm else R.float()
    logits = x @ model.W_U.detach().float().T
    if model.b_U is not None:
        logits = logits + model.b_U.detach().float()
    return softcap(logits, model.logit_softcap)


@torch.no_grad()
def evaluate_bank(model: Model, bank: LensBank, null: torch.Tensor, batches, chunk: int = 256,
                  progress: bool = True, total: int | None = None, top_k: int = 10) -> dict:
    """Metrics per site over ``batches`` (an iterable of ids [B, S]); see the module docstring.
    Positions go in chunks of ``chunk``, sites in blocks of at most ``BLOCK_ELEMENTS`` logits."""
    from tqdm import tqdm
    K = len(bank.sites)
    names = ("kl_lens", "kl_unembed", "kl_unembed_nonorm", "top1", "top1_unembed", "entropy")
    sums = {n: torch.zeros(K, dtype=torch.float64) for n in names}
    null_sum = 0.0
    ent_model = 0.0
    seq_gain = []  # per-sequence mean gain [K] (nats)
    lq_sum = torch.zeros(K, model.d_vocab, dtype=torch.float64)  # Σ over positions of the lens log-probs
    n = 0
    null = null.to(model.device).float()
    bar = tqdm(total=total, desc=f"lens eval ({K} heads)", unit="batch", disable=not progress, file=sys.stderr,
               bar_format="{l_bar}{bar}| {n:.2f}/{total_fmt} [{elapsed}<{remaining}]")
    for ids in batches:
        ids = ids.to(model.device)
        B, S = ids.shape
        R, logp = site_batch(model, ids, bank.sites)
        kl_null_t = (logp.exp() * (logp - torch.log_softmax(null, -1))).sum(-1)  # [N]
        kl_lens_t = torch.empty(K, R.shape[1])
        for a in range(0, R.shape[1], chunk):
            b = min(R.shape[1], a + chunk)
            lp = logp[a:b]
            p = lp.exp()
            neg_h = (p * lp).sum(-1)  # [n]
            target = lp.argmax(-1)
            ent_model += float(-neg_h.sum())
            per_block = max(1, BLOCK_ELEMENTS // ((b - a) * model.d_vocab))
            for k0 in range(0, K, per_block):
                ks = slice(k0, min(K, k0 + per_block))
                r = R[ks, a:b]
                lenses = bank.lens_index[ks]
                lg = bank(r, lenses=lenses)
                kl, lse = _kl_lse(lg, p, neg_h)
                kl_lens_t[ks, a:b] = kl.cpu()
                sums["top1"][ks] += (lg.argmax(-1) == target).double().sum(-1).cpu()
                lq_sum[ks] += (lg.sum(1) - lse.sum(1, keepdim=True)).double().cpu()
                q_l = torch.einsum("knv,knv->kn", torch.exp(lg - lse.unsqueeze(-1)), lg)
                sums["entropy"][ks] += (lse - q_l).double().sum(-1).cpu()
                del lg
                bl = baseline_logits(model, r, True)
                sums["kl_unembed"][ks] += _kl_lse(bl, p, neg_h)[0].double().sum(-1).cpu()
                sums["top1_unembed"][ks] += (bl.argmax(-1) == target).double().sum(-1).cpu()
                del bl
                bl = baseline_logits(model, r, False)
                sums["kl_unembed_nonorm"][ks] += _kl_lse(bl, p, neg_h)[0].double().sum(-1).cpu()
                del bl
                bar.update((ks.stop - ks.start) * (b - a) / (K * R.shape[1]))  # fractions of a batch
        sums["kl_lens"] += kl_lens_t.double().sum(-1)
        null_sum += float(kl_null_t.sum())
        diff = (kl_null_t.cpu().unsqueeze(0) - kl_lens_t).view(K, B, S).mean(-1)  # [K, B]
        seq_gain.append(diff.double())
        n += R.shape[1]
    bar.close()
    if n == 0:
        raise HeadscopeError("no held-out tokens to evaluate on")
    g = torch.cat(seq_gain, 1)  # [K, n_seq]
    se = g.std(1, unbiased=True) / math.sqrt(g.shape[1]) if g.shape[1] > 1 else torch.full((K,), float("nan"))
    per_head = {}
    kl_null = null_sum / n / LN2
    for i, (l, h) in enumerate(bank.sites):
        kl_lens = float(sums["kl_lens"][i]) / n / LN2
        kl_u = float(sums["kl_unembed"][i]) / n / LN2
        gain = kl_null - kl_lens
        gse = float(se[i]) / LN2
        per_head[f"{l}.{h}"] = {
            "layer": l, "head": h, "kl_lens": kl_lens, "kl_unembed": kl_u,
            "kl_unembed_nonorm": float(sums["kl_unembed_nonorm"][i]) / n / LN2, "kl_null": kl_null,
            "gain": gain, "gain_se": gse if math.isfinite(gse) else None,
            "informative": bool(gain > 0 and (not math.isfinite(gse) or gain > 2 * gse)),
            "improvement": kl_u - kl_lens, "top1": float(sums["top1"][i]) / n,
            "top1_unembed": float(sums["top1_unembed"][i]) / n,
            "entropy": float(sums["entropy"][i]) / n / LN2, "entropy_model": ent_model / n / LN2}
    lift = lq_sum / n - torch.log_softmax(null.double().cpu(), -1)
    top = lift.topk(min(top_k, lift.shape[-1]), -1).indices
    top_tokens = {f"{l}.{h}": model.token_str(top[i]) for i, (l, h) in enumerate(bank.sites)}
    return {"tokens": n, "kl_null": kl_null, "per_head": per_head, "top_tokens": top_tokens}


@torch.no_grad()
def transfer_matrix(model: Model, bank: LensBank, batches, sites_idx: list[int], chunk: int = 256) -> dict:
    """KL [i][j] (bits) of the lens of site ``sites_idx[i]`` applied to the output of site
    ``sites_idx[j]``, over ``batches``. The diagonal is each lens on its own head."""
    k = len(sites_idx)
    kl = torch.zeros(k, k, dtype=torch.float64)
    n = 0
    sub = [bank.sites[i] for i in sites_idx]
    own = bank.lens_index[torch.tensor(sites_idx)]
    for ids in batches:
        R, logp = site_batch(model, ids.to(model.device), sub)
        for a in range(0, R.shape[1], chunk):
            b = min(R.shape[1], a + chunk)
            p = logp[a:b].exp()
            neg_h = (p * logp[a:b]).sum(-1)
            for i in range(k):
                lenses = own[i].expand(k).to(R.device)
                kl[i] += _kl_lse(bank(R[:, a:b], lenses=lenses), p, neg_h)[0].double().sum(-1).cpu()
        n += R.shape[1]
    kl = kl / max(n, 1) / LN2
    return {"sites": [f"{l}.{h}" for l, h in sub], "kl": kl.tolist(), "tokens": n}


def _heatmap(model: Model, per_head: dict, key: str) -> list[list[float | None]]:
    grid = [[None] * model.n_heads for _ in range(model.n_layers)]
    for v in per_head.values():
        grid[v["layer"]][v["head"]] = v[key]
    return grid


def write_plots(model: Model, out: dict, folder) -> None:
    """``eval_gain.png`` / ``eval_improvement.png`` (layer × head, blank where no lens, red = positive)
    and ``transfer.png`` (gain of lens i read on head j) from an ``eval.json`` dict."""
    import numpy as np

    from ..heads.scores import heatmap
    for key, what in (("heatmap_gain", "information gain over the null lens"),
                      ("heatmap_improvement", "KL improvement over the unembedding")):
        v = np.array([[np.nan if x is None else x for x in row] for row in out[key]], dtype=float)
        m = float(np.nanmax(np.abs(v))) if np.isfinite(v).any() else 1.0
        heatmap(v, f"{what}\n(bits/token) — {model.name}", folder / f"eval_{key.split('_')[1]}.png",
                cmap="RdBu_r", vmin=-m, vmax=m)
    t = out.get("transfer")
    if t:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        g = np.array(t["gain"], dtype=float)
        m = float(np.abs(np.diag(g)).max()) or 1.0  # colours span the own-head gains; larger values clip
        k = len(t["sites"])
        fig, ax = plt.subplots(figsize=(max(4, 0.32 * k + 2), max(3.5, 0.3 * k + 1.5)))
        im = ax.imshow(np.clip(g, -m, m), cmap="RdBu_r", vmin=-m, vmax=m)
        ax.set_xticks(range(k), t["sites"], rotation=90, fontsize=7)
        ax.set_yticks(range(k), t["sites"], fontsize=7)
        ax.set_xlabel("head whose output is read")
        ax.set_ylabel("lens of head")
        ax.set_title(f"transfer: gain over the null lens (bits/token), {t['tokens']} tokens\n"
                     f"colours clipped at ±{m:.2f}; off-diagonal median "
                     f"{float(np.median(g[~np.eye(k, dtype=bool)])) if k > 1 else float('nan'):+.2f}",
                     fontsize=9)
        fig.colorbar(im, ax=ax, extend="both")
        fig.tight_layout()
        tmp = folder / "transfer.tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(folder / "transfer.png")


def run_eval(model: Model, run: RunDir, tokens: int = 4096, batch_size: int = 8, seq_len: int | None = None,
             corpus: str | None = None, transfer_tokens: int = 1024, transfer_sites: list[tuple[int, int]] | None = None,
             progress: bool = True) -> dict:
    """Evaluate the lenses in ``run/lens`` on held-out tokens; write ``run/lens/eval.json`` (see module
    docstring; keys: tokens, kl_null, per_head{"L.H": metrics}, heatmap_gain / heatmap_improvement
    [n_layers][n_heads] (None where no lens), n_heads, n_informative, transfer{sites, kl, gain})."""
    bank, info = load_bank(model, run / "lens")
    null = load_null(run / "lens")
    tr = info.get("train", {})
    seq_len = seq_len or tr.get("seq_len", 128)
    corpus_spec = corpus or tr.get("corpus", "default")
    data = TokenCorpus(model, corpus_spec, seq_len=seq_len, progress=progress)
    n_batches = math.ceil(max(1, tokens // seq_len) / batch_size)
    out = evaluate_bank(model, bank, null, data.batches("heldout", batch_size, max_tokens=tokens),
                        progress=progress, total=n_batches)
    ph = out["per_head"]
    out["heatmap_gain"] = _heatmap(model, ph, "gain")
    out["heatmap_improvement"] = _heatmap(model, ph, "improvement")
    out["n_heads"] = len(ph)
    out["n_positive_gain"] = sum(v["gain"] > 0 for v in ph.values())
    out["n_informative"] = sum(v["informative"] for v in ph.values())
    out["median_gain"] = float(torch.tensor([v["gain"] for v in ph.values()]).median())
    if transfer_tokens and len(bank.sites) > 1:
        if transfer_sites:
            idx = [bank.sites.index(tuple(s)) for s in transfer_sites if tuple(s) in bank.sites]
        else:
            step = max(1, math.ceil(len(bank.sites) / MAX_TRANSFER_SITES))
            idx = list(range(0, len(bank.sites), step))[:MAX_TRANSFER_SITES]
        t = transfer_matrix(model, bank, data.batches("heldout", batch_size, max_tokens=transfer_tokens), idx)
        kn = out["kl_null"]
        t["gain"] = [[kn - v for v in row] for row in t["kl"]]
        out["transfer"] = t
    write_json(run / "lens" / "eval.json", out)
    write_plots(model, out, run / "lens")
    run.mark_done("lens_eval", {"n_heads": out["n_heads"], "n_informative": out["n_informative"]})
    return out


def run_checkpoint_transfer(other: Model, run: RunDir, tokens: int = 2048, batch_size: int = 8,
                            progress: bool = True) -> dict:
    """Apply the lenses of ``run`` (trained on one checkpoint) to ``other``, a checkpoint of the same
    architecture (e.g. the fine-tuned model), on its own held-out tokens and its own null lens (fitted on
    ``tokens`` of its train split). Writes ``run/lens/transfer_checkpoint.json``."""
    bank, info = load_bank(other, run / "lens", allow_other_checkpoint=True)
    tr = info.get("train", {})
    data = TokenCorpus(other, tr.get("corpus", "default"), seq_len=tr.get("seq_len", 128), progress=progress)
    psum, n = None, 0
    with torch.no_grad():
        for ids in data.batches("train", batch_size, max_tokens=tokens):
            _, lp = site_batch(other, ids.to(other.device), bank.sites[:1])
            s = lp.exp().double().sum(0)
            psum = s if psum is None else psum + s
            n += lp.shape[0]
    null = torch.log((psum / n).clamp_min(1e-30)).float()
    out = evaluate_bank(other, bank, null, data.batches("heldout", batch_size, max_tokens=tokens), progress=progress)
    out["source_model"] = info["model"]
    out["target_model"] = other.identity()
    out["n_positive_gain"] = sum(v["gain"] > 0 for v in out["per_head"].values())
    write_json(run / "lens" / "transfer_checkpoint.json", out)
    return out
