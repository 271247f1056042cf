"""Held-out evaluation of a bank of lenses against the unembedding baseline, the null lens and a
control lens.

Per site (layer ℓ, head h), on held-out windows spread over all documents of the held-out split
(headscope.sampling.Windows), position 0 left out (bits/token; p = the model's final distribution):

* ``kl_lens``      KL(p ‖ lens(r_h))
* ``kl_unembed``   KL(p ‖ softmax(W_U·N(r_h) + b_U))   — the unembedding baseline (docs/design.md)
* ``kl_unembed_nonorm`` KL(p ‖ softmax(W_U·r_h + b_U))
* ``kl_null``      KL(p ‖ softmax(c0)), c0 = log mean p over every training position (ignores the head)
* ``gain``         kl_null − kl_lens: what the lens reads out of this head beyond base rates, with
  ``gain_se`` its standard error clustered by document, ``p_value`` of the one-sided test gain > 0 and
  ``informative`` = Benjamini–Hochberg discovery at q = 0.05 over all heads (verdict.py; the old rule
  gain > 2·SE is kept as ``informative_2se``).
* ``control``      the same metrics for the control lens(es): trained and evaluated on a head output
  scrambled across sequences and positions, they show what a gain looks like when there is nothing to
  read (it should sit at or below zero within its SE).
* ``top_tokens``   per site, the tokens with the largest mean term q·log(q/q_null) of KL(lens ‖ null)
  over held-out positions (needs both probability and lift); ``improvement`` kl_unembed − kl_lens;
  ``top1`` agreement of the lens' argmax with p's; ``entropy`` of the lens (bits) and ``entropy_model``.

``run_eval`` writes ``run/lens/eval.json`` (and the plots); an optional cross-site transfer matrix (lens
of site i applied to site j's output) goes in the same file under ``transfer``.
``run_checkpoint_transfer`` applies the lenses to another checkpoint of the same architecture
(``transfer_checkpoint.json``).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from ..data import TokenCorpus
from ..errors import HeadscopeError
from ..models.load import Model
from ..runs import RunDir, write_json
from ..stats import cluster_bootstrap_se, clustered_mean_se, one_sided_p
from .collect import site_batch
from .lenses import LensBank, load_bank, softcap
from .objectives import LN2
from ..sampling import Windows
from .options import EvalOptions
from .sampling import select_positions
from .train import load_null
from .verdict import Q, decide

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


def eval_generator(seed: int, batch: int) -> torch.Generator:
    """The generator that scrambles the control rows of evaluation batch ``batch``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + batch + 7)


@torch.no_grad()
def evaluate_bank(model: Model, bank: LensBank, null: torch.Tensor, batches, chunk: int = 256,
                  progress: bool = True, total: int | None = None, top_k: int = 10, seed: int = 0,
                  baselines: bool = True, stride: int = 1) -> dict:
    """Metrics per site over ``batches`` (an iterable of (ids [B, S], docs [B]) or of ids alone, each
    sequence then its own document); see the module docstring.

    Two phases: the forward passes first (each site's z — or r when the lens does not read z — and the
    model's distribution at the kept positions), then the lenses block of sites by block of sites over
    all positions, so that a block's z-maps (:meth:`LensBank.z_maps`, Dh·V per site) are built once.
    Positions go in chunks of ``chunk``, sites in blocks of at most ``BLOCK_ELEMENTS`` logits. Control
    lenses are evaluated like sites and reported under ``control``. ``baselines=False`` skips the two
    unembedding baselines (d·V per site and position each; ``kl_unembed``/``improvement`` are then None).
    ``stride`` keeps every stride-th kept position of each window: the lenses' cost (heads · positions · V)
    falls by that factor while the windows — and so the documents the SE is clustered over — stay."""
    from tqdm import tqdm
    K = len(bank.all_sites)
    use_z = bank.reads_z()
    # -- phase 1: forward passes ---------------------------------------------------------------------
    Xs, lps, win_tokens, win_docs = [], [], [], []
    n_seq = 0
    bar = tqdm(total=total, desc=f"lens eval: forward passes ({len(bank.sites)} heads + {len(bank.control_sites)} control)",
               unit="batch", disable=not progress, file=sys.stderr)
    for bi, item in enumerate(batches):
        ids, docs = item if isinstance(item, tuple) else (item, None)
        docs = np.arange(n_seq, n_seq + ids.shape[0]) if docs is None else np.asarray(docs)
        n_seq += ids.shape[0]
        B = ids.shape[0]
        X, logp = site_batch(model, ids.to(model.device), bank.all_sites, space="z" if use_z else "result")
        X, logp, _ = select_positions(X, logp, ids.cpu(), len(bank.control_sites), eval_generator(seed, bi))
        if stride > 1:   # every window keeps the same positions: take every stride-th of each
            sub = torch.arange(X.shape[1]).view(B, -1)[:, ::stride].reshape(-1)
            X, logp = X[:, sub], logp[sub]
        Xs.append(X)
        lps.append(logp)
        win_tokens += [X.shape[1] // B] * B   # every window keeps the same positions
        win_docs += list(docs)
        bar.update(1)
    bar.close()
    n = sum(lp.shape[0] for lp in lps)
    if n == 0:
        raise HeadscopeError("no held-out tokens to evaluate on")
    X, p = torch.cat(Xs, 1), torch.cat(lps)
    del Xs, lps
    null = null.to(p.device).float()
    log_null = torch.log_softmax(null, -1)
    target = p.argmax(-1)
    neg_h = (p.exp() * p).sum(-1)                      # [n] Σ p·log p
    p.exp_()                                           # p now holds probabilities (in place of log p)
    kl_null_t = neg_h - p @ log_null                   # [n] KL(p ‖ null)
    ent_model = float(-neg_h.sum())
    # -- phase 2: the lenses, a block of sites at a time ---------------------------------------------
    names = ("kl_lens", "kl_unembed", "kl_unembed_nonorm", "top1", "top1_unembed", "entropy")
    sums = {nm: torch.zeros(K, dtype=torch.float64) for nm in names}
    qlogq = torch.zeros(K, model.d_vocab, dtype=torch.float64)  # Σ over positions of q·log q
    qsum = torch.zeros(K, model.d_vocab, dtype=torch.float64)   # Σ over positions of q
    kl_lens_t = torch.empty(K, n)
    W_O = {}
    per_block = max(1, BLOCK_ELEMENTS // (min(chunk, n) * model.d_vocab))
    bar = tqdm(total=K * n, desc=f"lens eval: {len(bank.sites)} heads + {len(bank.control_sites)} control",
               unit=" head·pos", unit_scale=True, disable=not progress, file=sys.stderr)
    for k0 in range(0, K, per_block):
        ks = slice(k0, min(K, k0 + per_block))
        rows = list(range(ks.start, ks.stop))
        maps = bank.z_maps(rows) if use_z else None
        if use_z and baselines:
            for l_ in {bank.all_sites[i][0] for i in rows} - W_O.keys():
                W_O[l_] = model.W_O(l_).detach().float()                        # [H, Dh, d], once per layer
            W_O_blk = torch.stack([W_O[l_][h_] for l_, h_ in (bank.all_sites[i] for i in rows)])   # [k, Dh, d]
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            xs = X[ks, a:b].to(model.device)
            lg = bank.logits_from_z(xs, maps, rows) if use_z else bank(xs, lenses=bank.lens_index[ks])
            kl, lse = _kl_lse(lg, p[a:b], neg_h[a:b])
            kl_lens_t[ks, a:b] = kl.cpu()
            sums["top1"][ks] += (lg.argmax(-1) == target[a:b]).double().sum(-1).cpu()
            lg.sub_(lse.unsqueeze(-1))  # log q, in place
            q = lg.exp()
            qsum[ks] += q.sum(1).double().cpu()
            qlogq[ks] += q.mul_(lg).sum(1).double().cpu()
            del lg, q
            if baselines:
                r = torch.bmm(xs, W_O_blk.to(xs.device)) if use_z else xs
                bl = baseline_logits(model, r, True)
                sums["kl_unembed"][ks] += _kl_lse(bl, p[a:b], neg_h[a:b])[0].double().sum(-1).cpu()
                sums["top1_unembed"][ks] += (bl.argmax(-1) == target[a:b]).double().sum(-1).cpu()
                del bl
                bl = baseline_logits(model, r, False)
                sums["kl_unembed_nonorm"][ks] += _kl_lse(bl, p[a:b], neg_h[a:b])[0].double().sum(-1).cpu()
                del bl
            bar.update((ks.stop - ks.start) * (b - a))
    bar.close()
    del p, X
    sums["kl_lens"] = kl_lens_t.double().sum(-1)
    sums["entropy"] = -qlogq.sum(-1)
    term_sum = qlogq - qsum * log_null.double().cpu()   # Σ q·(log q − log q_null) per token [K, V]
    null_sum = float(kl_null_t.sum())
    # per window: the mean gain of each site [K, windows]
    win = torch.repeat_interleave(torch.arange(len(win_tokens)), torch.tensor(win_tokens))
    diff = kl_null_t.cpu().unsqueeze(0) - kl_lens_t
    win_gain = [torch.zeros(K, len(win_tokens), dtype=torch.float64).index_add_(1, win, diff.double())
                / torch.tensor(win_tokens, dtype=torch.float64)]
    gw = torch.cat(win_gain, 1).numpy() / LN2  # [K, windows] bits
    w = np.asarray(win_tokens, dtype=np.float64)
    _, se, G = clustered_mean_se(gw, w, win_docs)
    df = G - 1 if G >= 2 else None
    p_val = one_sided_p(gw @ w / w.sum(), se, df)
    kl_null = null_sum / n / LN2
    rows = {}
    for i, (l, h) in enumerate(bank.all_sites):
        kl_lens = float(sums["kl_lens"][i]) / n / LN2
        kl_u = float(sums["kl_unembed"][i]) / n / LN2 if baselines else None
        gse = float(se[i])
        rows[i] = {
            "layer": l, "head": h, "kl_lens": kl_lens, "kl_unembed": kl_u,
            "kl_unembed_nonorm": float(sums["kl_unembed_nonorm"][i]) / n / LN2 if baselines else None,
            "kl_null": kl_null, "gain": kl_null - kl_lens, "gain_se": gse if math.isfinite(gse) else None,
            "p_value": float(p_val[i]) if math.isfinite(p_val[i]) else None,
            "improvement": kl_u - kl_lens if baselines else None, "top1": float(sums["top1"][i]) / n,
            "top1_unembed": float(sums["top1_unembed"][i]) / n if baselines else None,
            "entropy": float(sums["entropy"][i]) / n / LN2, "entropy_model": ent_model / n / LN2}
    Kr = len(bank.sites)
    per_head = {f"{l}.{h}": rows[i] for i, (l, h) in enumerate(bank.sites)}
    verdict = decide(per_head, df)
    for name, v in verdict.items():
        per_head[name].update(v)
    control = {}
    for j, (l, h) in enumerate(bank.control_sites):
        c = rows[Kr + j]
        c["source"] = f"{l}.{h}"
        c["input"] = "source head output from another sequence of the batch at a random position"
        c["informative_2se"] = bool(c["gain_se"] is not None and c["gain"] > 2 * c["gain_se"])
        control[f"control{j}"] = c
    term = term_sum / n / LN2  # [K, V] mean KL term per token, bits
    top_tokens, top_terms = {}, {}
    for i, (l, h) in enumerate(bank.sites):
        v, ix = term[i].topk(min(top_k, term.shape[-1]))
        keep = v > 0
        top_tokens[f"{l}.{h}"] = model.token_str(ix[keep])
        top_terms[f"{l}.{h}"] = [round(float(x), 6) for x in v[keep]]
    # per-document sums of each head's gain, for a bootstrap SE of the median gain over heads
    docs_u, inv = np.unique(np.asarray(win_docs), return_inverse=True)
    doc_sum = np.zeros((Kr, len(docs_u)))
    np.add.at(doc_sum.T, inv, (gw[:Kr] * w).T)
    doc_n = np.bincount(inv, weights=w)
    med_se = cluster_bootstrap_se(doc_sum, doc_n, lambda m: np.median(m, -1))
    return {"tokens": n, "windows": int(len(w)), "documents": int(G), "df": df, "q": Q,
            "positions_left_out": "position 0 of every window (BOS: its context is the same in every sequence)",
            "kl_null": kl_null, "per_head": per_head, "control": control,
            "median_gain_se": med_se if math.isfinite(med_se) else None,
            "top_tokens": top_tokens, "top_tokens_kl_bits": top_terms}


def eval_windows(model: Model, corpus: TokenCorpus, tokens: int, batch_size: int, split: str = "heldout", seed: int = 0):
    """(batches of (ids, docs), number of batches, windows) for ``tokens`` held-out tokens spread over the
    documents of ``split``."""
    win = Windows(corpus, split, seed=seed)
    n = min(len(win), max(2, math.ceil(tokens / corpus.seq_len)))  # the whole split at most
    return win.batches(batch_size, n), math.ceil(n / batch_size), win


@torch.no_grad()
def transfer_matrix(model: Model, bank: LensBank, batches, sites_idx: list[int], chunk: int = 256) -> dict:
    """KL [i][j] (bits) of the lens of site ``sites_idx[i]`` applied to the output of site
    ``sites_idx[j]``, over ``batches``. The diagonal is each lens on its own head."""
    k = len(sites_idx)
    kl = torch.zeros(k, k, dtype=torch.float64)
    n = 0
    sub = [bank.sites[i] for i in sites_idx]
    own = bank.lens_index[torch.tensor(sites_idx)]
    for item in batches:
        ids = item[0] if isinstance(item, tuple) else item
        R, logp = site_batch(model, ids.to(model.device), sub)
        R, logp, _ = select_positions(R, logp, ids)
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
    """``eval_gain.png`` (layer × head gain, red = positive; heads that are not informative under the
    BH rule are marked with a dot; the control lens' gain in the title), ``eval_improvement.png`` and,
    when computed, ``transfer.png`` (gain of lens i read on head j), from an ``eval.json`` dict."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..runs import atomic_write_bytes
    import io

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, dpi=110, format="png")
        plt.close(fig)
        atomic_write_bytes(folder / name, buf.getvalue())

    ctrl = "; ".join(f"control lens {c['gain']:+.3f} ± {c['gain_se'] or float('nan'):.3f}" for c in out.get("control", {}).values())
    for key, what in (("heatmap_gain", "information gain over the null lens"),
                      ("heatmap_improvement", "KL improvement over the unembedding")):
        v = np.array([[np.nan if x is None else x for x in row] for row in out[key]], dtype=float)
        if not np.isfinite(v).any():   # e.g. no unembedding baselines measured
            continue
        m = float(np.nanmax(np.abs(v))) if np.isfinite(v).any() else 1.0
        fig, ax = plt.subplots(figsize=(max(4.5, 0.45 * v.shape[1] + 2.5), max(3.5, 0.24 * v.shape[0] + 1.8)))
        im = ax.imshow(v, cmap="RdBu_r", vmin=-m, vmax=m, aspect="auto")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(v.shape[1]))
        title = f"{what} (bits/token) — {model.name}"
        if key == "heatmap_gain":
            for name, ph in out["per_head"].items():
                if not ph.get("informative"):
                    ax.plot(ph["head"], ph["layer"], "k.", ms=3)
            title += (f"\n{out['n_informative']}/{out['n_heads']} informative (BH q={out.get('q', Q)}; dot: not), "
                      f"{out['tokens']} tokens, {out['documents']} docs" + (f"\n{ctrl}" if ctrl else ""))
        ax.set_title(title, fontsize=8)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        save(fig, f"eval_{key.split('_')[1]}.png")
    t = out.get("transfer")
    if t:
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
                     "(a closed-form lens lives in its own head's subspace: off-diagonal losses are by construction)",
                     fontsize=8)
        fig.colorbar(im, ax=ax, extend="both")
        fig.tight_layout()
        save(fig, "transfer.png")


def run_eval(model: Model, run: RunDir, opts: EvalOptions, progress: bool = True, *, seq_len: int | None = None,
             corpus: str | None = None, transfer_sites: list[tuple[int, int]] | None = None, seed: int = 0) -> dict:
    """Evaluate the lenses in ``run/lens`` on ``opts.tokens`` held-out tokens spread over the held-out documents
    (``corpus``/``seq_len``: default the lenses' training corpus and length; ``transfer_sites``: the heads of
    the transfer matrix, default up to ``MAX_TRANSFER_SITES`` spread over the bank);
    write ``run/lens/eval.json`` (see module docstring; keys: tokens, windows, documents, df, q, kl_null,
    per_head{"L.H": metrics}, control{…}, top_tokens, heatmap_gain / heatmap_improvement
    [n_layers][n_heads] (None where no lens), n_heads, n_positive_gain, n_informative (BH),
    n_informative_2se, median_gain (± median_gain_se, cluster bootstrap), transfer{sites, kl, gain})."""
    tokens, batch_size, transfer_tokens = opts.tokens, opts.batch_size, opts.transfer_tokens
    baselines, stride = opts.baselines, opts.stride
    bank, info = load_bank(model, run / "lens")
    null = load_null(run / "lens")
    tr = info.get("train", {})
    seq_len = seq_len or tr.get("seq_len", 128)
    corpus_spec = corpus or tr.get("corpus", "default")
    data = TokenCorpus(model, corpus_spec, seq_len=seq_len, progress=progress)
    batches, n_batches, _ = eval_windows(model, data, tokens * stride, batch_size, seed=seed)
    out = evaluate_bank(model, bank, null, batches, progress=progress, total=n_batches, seed=seed, baselines=baselines,
                        stride=stride)
    out["baselines"], out["stride"] = baselines, stride
    ph = out["per_head"]
    out["heatmap_gain"] = _heatmap(model, ph, "gain")
    out["heatmap_improvement"] = _heatmap(model, ph, "improvement")
    out["n_heads"] = len(ph)
    out["n_positive_gain"] = sum(v["gain"] > 0 for v in ph.values())
    out["n_informative"] = sum(v["informative"] for v in ph.values())
    out["n_informative_2se"] = sum(v["informative_2se"] for v in ph.values())
    out["median_gain"] = float(np.median([v["gain"] for v in ph.values()]))
    if transfer_tokens and len(bank.sites) > 1:
        if transfer_sites:
            idx = [bank.sites.index(tuple(s)) for s in transfer_sites if tuple(s) in bank.sites]
        else:
            step = max(1, math.ceil(len(bank.sites) / MAX_TRANSFER_SITES))
            idx = list(range(0, len(bank.sites), step))[:MAX_TRANSFER_SITES]
        tb, _, _ = eval_windows(model, data, transfer_tokens, batch_size, seed=seed)
        t = transfer_matrix(model, bank, tb, idx)
        kn = out["kl_null"]
        t["gain"] = [[kn - v for v in row] for row in t["kl"]]
        out["transfer"] = t
    write_json(run / "lens" / "eval.json", out)
    write_plots(model, out, run / "lens")
    return out


def run_checkpoint_transfer(model: Model, run: RunDir, opts: EvalOptions, progress: bool = True) -> dict:
    """Apply the lenses of ``run`` (trained on one checkpoint) to ``model``, another checkpoint of the same
    architecture (e.g. the fine-tuned model), on its own held-out tokens and its own null lens (fitted on
    ``opts.tokens`` train tokens spread over the train documents, position 0 left out); ``opts.batch_size``,
    ``stride`` and ``baselines`` as in :func:`run_eval` (no transfer matrix: ``transfer_tokens`` must be 0).
    Writes ``run/lens/transfer_checkpoint.json``."""
    if opts.transfer_tokens:
        raise HeadscopeError("checkpoint transfer has no cross-head transfer matrix: leave --transfer-tokens at 0")
    tokens, batch_size = opts.tokens, opts.batch_size
    bank, info = load_bank(model, run / "lens", allow_other_checkpoint=True)
    tr = info.get("train", {})
    data = TokenCorpus(model, tr.get("corpus", "default"), seq_len=tr.get("seq_len", 128), progress=progress)
    psum, n = None, 0
    train_batches, _, _ = eval_windows(model, data, tokens, batch_size, split="train", seed=1)
    with torch.no_grad():
        for ids, _ in train_batches:
            _, lp = site_batch(model, ids.to(model.device), bank.sites[:1])
            lp = lp[select_positions(torch.zeros(1, lp.shape[0], 1), None, ids)[2].to(lp.device)]
            s = lp.exp().double().sum(0)
            psum = s if psum is None else psum + s
            n += lp.shape[0]
    null = torch.log((psum / n).clamp_min(1e-30)).float()
    batches, nb, _ = eval_windows(model, data, tokens * opts.stride, batch_size)
    out = evaluate_bank(model, bank, null, batches, progress=progress, total=nb, baselines=opts.baselines,
                        stride=opts.stride)
    out["source_model"] = info["model"]
    out["target_model"] = model.identity()
    out["n_positive_gain"] = sum(v["gain"] > 0 for v in out["per_head"].values())
    out["n_informative"] = sum(v["informative"] for v in out["per_head"].values())
    write_json(run / "lens" / "transfer_checkpoint.json", out)
    return out
