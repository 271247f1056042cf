"""Evaluating an attention-output SAE on held-out tokens: ``run_eval(model, run, EvalOptions(name=…)) -> dict``
(the ``sae.eval`` stage).

Data: ``n_tokens // seq_len`` held-out sequences drawn by the shared sampler (:mod:`headscope.sampling`:
a seeded uniform sample of the split's sequences, so over its documents, not the first few), each
tagged with the document its first token belongs to.
Positions ≥ 1 only: z at the BOS position 0 is a constant (kept exact in every variant, see
:mod:`headscope.sae.store`), and the prediction made at position 0 (context: BOS alone) is the same
in every sequence, so it is left out of CE and KL too.

Reconstruction metrics (over the N token rows z[b, t ≥ 1]):

* ``l0``: mean number of active features per token.
* ``fve``: fraction of variance explained, 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄ the mean z over the eval tokens).
* ``nmse``: Σ‖x − x̂‖² / Σ‖x‖²; ``cosine``: mean cos(x, x̂); ``l2_ratio``: mean ‖x̂‖ / ‖x‖.
* ``dead_frac``: features that never fire on the eval tokens; ``dense_frac``: features firing on more
  than 10 % of tokens; ``density_hist``: histogram of log10 firing frequency (dead features left out).

Downstream metrics: the reconstruction x̂ is spliced into the forward pass in place of z (a capture
``patch`` intervention at the output-projection input) and compared with ablating z, either to zero or
to the mean z of the train split (per head; the stronger baseline: zeroing z can be so destructive that
any reconstruction looks good). Sums over the predictions at positions 1..S−2:

* ``kl_recovered_{zero,mean} = 1 − Σ KL(p_clean ‖ p_sae) / Σ KL(p_clean ‖ p_abl)``: both sums are ≥ 0,
  so it is well defined whenever the ablation changes the predictions at all. **The headline score.**
* ``ce_recovered_{zero,mean} = (Σ CE_abl − Σ CE_sae) / (Σ CE_abl − Σ CE_clean)``: a ratio of two
  differences of CE, each of which can have either sign; when the ablation barely moves CE it is
  noise (values above 1 or below 0 appear).

Uncertainty: every recovered score and every ablation effect (the ratio's denominator per predicted
token: ``CE_abl − CE_clean`` resp. ``KL(p_clean ‖ p_abl)``, nats) gets a 95 % confidence interval
from a paired BCa bootstrap over documents (``scipy.stats.bootstrap``; the per-document sums are
resampled together, so the interval is clustered by document). **Rule**: a recovered score is
``meaningful`` only when the lower CI bound of its ablation effect is at least ``min_effect`` nats per
predicted token (default 0.05); otherwise the ablation changes too little for the ratio to say
anything, and eval.json says so. ``headline`` is the first meaningful one of kl_recovered_mean,
kl_recovered_zero (else kl_recovered_zero, marked not meaningful). The no-information controls are
the ablations themselves: a reconstruction that ignores its input (x̂ = the mean z) scores exactly 0
against mean-ablation (tested).

Writes ``sae/<name>/eval.json``, ``sae/<name>/sparsity.safetensors`` (SAELens: key ``sparsity``, log10
frequency), ``sae/<name>/feature_counts.safetensors`` and ``sae/<name>/eval_density.png``.
"""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import torch

from ..capture import HeadIntervention, capture
from ..data import TokenCorpus
from ..errors import HeadscopeError
from ..models.load import Model
from ..runs import RunDir, read_json, write_json, write_tensors
from ..sampling import sample_sequences
from .io import load_sae
from .train import sae_dir

from ..options import check
from .options import EvalOptions, eval_outputs

DENSE = 0.1
MIN_EFFECT = EvalOptions.__dataclass_fields__["min_effect"].default
"""Default ``min_effect``: nats per predicted token an ablation must change (lower CI bound)."""
LEVEL = 0.95
HEADLINE_ORDER = ("kl_recovered_mean", "kl_recovered_zero")
PER_SEQ_KEYS = ("ce_clean", "ce_sae", "ce_zero", "ce_mean", "kl_sae", "kl_zero", "kl_mean")


def _batches(corpus: TokenCorpus, split: str, idx: np.ndarray, batch_size: int):
    for b in range(0, len(idx), batch_size):
        yield torch.stack([corpus.sequence(split, int(i)) for i in idx[b:b + batch_size]])


@torch.no_grad()
def mean_z(model: Model, corpus: TokenCorpus, layer: int, n_tokens: int = 16384, batch_size: int = 8) -> torch.Tensor:
    """Mean z of ``layer`` over positions ≥ 1 of ``n_tokens // seq_len`` train sequences sampled across
    the train split (:func:`headscope.sampling.sample_sequences`), [H, Dh]."""
    idx, _ = sample_sequences(corpus, "train", max(1, n_tokens // corpus.seq_len))
    total, n = None, 0
    for ids in _batches(corpus, "train", idx, batch_size):
        z = capture(model, ids, layers=[layer], what=("z",), stop_after=layer)["z"][layer][:, 1:].double()
        s = z.sum((0, 1))
        total = s if total is None else total + s
        n += z.shape[0] * z.shape[1]
    return (total / max(n, 1)).float()


# -- per-sequence losses ---------------------------------------------------------------------------
def _ce_seq(lp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B]: summed next-token cross-entropy of the predictions made at positions 1..S−2."""
    return -lp[:, 1:-1].gather(-1, ids[:, 2:, None].to(lp.device)).squeeze(-1).double().sum(1)


def _kl_seq(lp_clean: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """[B]: summed KL(p_clean ‖ p) over positions 1..S−2."""
    a, b = lp_clean[:, 1:-1], lp[:, 1:-1]
    return (a.exp() * (a - b)).sum(-1).double().sum(1)


# -- confidence intervals --------------------------------------------------------------------------
def bootstrap_ci(samples: tuple[np.ndarray, ...], statistic, n_boot: int = 2000, seed: int = 0,
                 level: float = LEVEL) -> list[float] | None:
    """Paired BCa bootstrap CI of ``statistic(*samples, axis=-1)`` over the common sample axis
    (one entry per cluster), with ``scipy.stats.bootstrap``; the percentile interval where BCa is
    undefined (a degenerate resampling distribution) or excludes the estimate itself (BCa's
    acceleration blows up for a ratio whose denominator is near 0). None with fewer than 2 clusters."""
    from scipy import stats
    if len(samples[0]) < 2:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        est = float(statistic(*samples))
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore")
            r = stats.bootstrap(samples, statistic, paired=True, vectorized=True, n_resamples=n_boot,
                                confidence_level=level, method=method, axis=-1, rng=np.random.default_rng(seed))
        lo, hi = float(r.confidence_interval.low), float(r.confidence_interval.high)
        if math.isfinite(lo) and math.isfinite(hi) and (method == "percentile" or lo - 1e-9 <= est <= hi + 1e-9):
            return [lo, hi]
    return None


def _sum(x, axis=-1):
    return np.sum(x, axis=axis)


def _kl_rec(kl_sae, kl_abl, axis=-1):
    return 1 - _sum(kl_sae, axis) / _sum(kl_abl, axis)


def _ce_rec(ce_abl, ce_sae, ce_clean, axis=-1):
    return (_sum(ce_abl, axis) - _sum(ce_sae, axis)) / (_sum(ce_abl, axis) - _sum(ce_clean, axis))


def _per_token(num, n, axis=-1):
    return _sum(num, axis) / _sum(n, axis)


def recovered_scores(per_doc: dict[str, np.ndarray], n_boot: int = 2000, seed: int = 0,
                     min_effect: float = MIN_EFFECT, level: float = LEVEL) -> dict:
    """KL/CE recovered (vs zero- and mean-ablation) with bootstrap CIs, from per-cluster sums.

    ``per_doc``: arrays [D] (one entry per document): ``n`` (predictions) and the summed
    ``ce_clean, ce_sae, ce_zero, ce_mean, kl_sae, kl_zero, kl_mean``. Returns
    ``{score: {value, ci, ablation_effect, ablation_effect_ci, meaningful}}`` for the four scores and
    ``headline`` (see the module docstring for the rule)."""
    d = {k: np.asarray(v, dtype=np.float64) for k, v in per_doc.items()}
    n = d["n"]
    out = {}
    for base in ("zero", "mean"):
        specs = {
            f"kl_recovered_{base}": ((d["kl_sae"], d[f"kl_{base}"]), _kl_rec, d[f"kl_{base}"]),
            f"ce_recovered_{base}": ((d[f"ce_{base}"], d["ce_sae"], d["ce_clean"]), _ce_rec,
                                     d[f"ce_{base}"] - d["ce_clean"]),
        }
        for key, (samples, fn, effect) in specs.items():
            eff = float(_per_token(effect, n))
            den = float(effect.sum())
            with np.errstate(divide="ignore", invalid="ignore"):
                value = float(fn(*samples)) if abs(den) > 1e-12 else None
            eff_ci = bootstrap_ci((effect, n), _per_token, n_boot, seed, level)
            ci = bootstrap_ci(samples, fn, n_boot, seed, level) if value is not None else None
            out[key] = {"value": value, "ci": ci, "ablation_effect": eff, "ablation_effect_ci": eff_ci,
                        "meaningful": bool(value is not None and eff_ci is not None and eff_ci[0] >= min_effect)}
    best = next((k for k in HEADLINE_ORDER if out[k]["meaningful"]), HEADLINE_ORDER[-1])
    out["headline"] = {"score": best} | out[best]
    return out


# -- evaluation ------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_sae(model: Model, sae, corpus: TokenCorpus, n_tokens: int = 8192, batch_size: int = 4,
                 mean: torch.Tensor | None = None, splice: bool = True, progress: bool = True,
                 mean_tokens: int = 16384, n_boot: int = 2000, min_effect: float = MIN_EFFECT, seed: int = 0) -> dict:
    """Metrics of ``sae`` on ``n_tokens // seq_len`` held-out sequences spread over the split (see
    the module docstring). ``sae`` is used only through ``encode(x [N, d_in]) -> [N, F]`` and
    ``decode(acts) -> [N, d_in]`` (and ``cfg.layer``, ``cfg.d_sae``), so every architecture works.

    ``mean``: mean z [H, Dh] for the mean-ablation baseline (if None: from ``mean_tokens`` train tokens).
    ``splice=False`` skips the three extra forward passes (reconstruction metrics only).
    Returns a JSON-ready dict; firing counts [F] are added under ``_counts`` and the per-sequence
    sums under ``_per_seq`` (arrays [n_seq], with ``doc`` and ``n``).
    """
    from tqdm import tqdm
    L, dev = sae.cfg.layer, model.device
    sae = sae.to(dev).eval()
    H, Dh = model.n_heads, model.d_head
    if splice and mean is None:
        mean = mean_z(model, corpus, L, n_tokens=mean_tokens)
    F = sae.cfg.d_sae
    idx, docs = sample_sequences(corpus, "heldout", max(1, n_tokens // corpus.seq_len))
    acc = {k: 0.0 for k in ("sq_err", "sq_norm", "cos", "ratio", "l0")}
    per_seq = {k: [] for k in PER_SEQ_KEYS}
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64, device=dev)
    counts = torch.zeros(F, dtype=torch.long, device=dev)
    n_rows = 0
    for ids in tqdm(_batches(corpus, "heldout", idx, batch_size), total=math.ceil(len(idx) / batch_size),
                    file=sys.stderr, desc=f"eval SAE layer {L}", disable=not progress, unit=" batch"):
        ids = ids.to(dev)
        what = ("z", "resid_pre", "logprobs") if splice else ("z",)
        cap = capture(model, ids, layers=[L], what=what, stop_after=None if splice else L)
        z = cap["z"][L]
        x = z[:, 1:].reshape(-1, H * Dh).float()
        if not torch.isfinite(x).all():
            raise HeadscopeError(f"non-finite z activations at layer {L} in the eval data")
        acts = sae.encode(x)
        recon = sae.decode(acts)
        acc["sq_err"] += (recon - x).pow(2).sum().item()
        acc["sq_norm"] += x.pow(2).sum().item()
        acc["cos"] += torch.nn.functional.cosine_similarity(recon, x, dim=-1).sum().item()
        acc["ratio"] += (recon.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum().item()
        active = acts > 0
        acc["l0"] += active.sum().item()
        counts += active.sum(0)
        sum_x += x.double().sum(0)
        n_rows += x.shape[0]
        if splice:
            zhat = z.clone()
            zhat[:, 1:] = recon.reshape(z.shape[0], z.shape[1] - 1, H, Dh).to(z.dtype)
            lp_clean = cap.logprobs
            runs = {
                "sae": [HeadIntervention(L, kind="patch", value=zhat)],
                "zero": [HeadIntervention(L, kind="zero", positions=slice(1, None))],
                "mean": [HeadIntervention(L, kind="mean", value=mean.to(dev, z.dtype), positions=slice(1, None))],
            }
            per_seq["ce_clean"].append(_ce_seq(lp_clean, ids).cpu())
            start = (L, cap["resid_pre"][L])   # the spliced passes differ from the clean one from layer L on
            for key, ivs in runs.items():
                lp = capture(model, ids, layers=[], what=("logprobs",), interventions=ivs, resume=start).logprobs
                per_seq[f"ce_{key}"].append(_ce_seq(lp, ids).cpu())
                per_seq[f"kl_{key}"].append(_kl_seq(lp_clean, lp).cpu())
                del lp
    if n_rows == 0:
        raise HeadscopeError("no held-out tokens to evaluate on")
    # Σ‖x − x̄‖² = Σ‖x‖² − N‖x̄‖²
    var = acc["sq_norm"] - (sum_x.pow(2).sum() / n_rows).item()
    freq = counts.double() / n_rows
    alive = freq > 0
    log_freq = torch.log10(freq.clamp_min(1e-10))
    hist_counts, edges = torch.histogram(log_freq[alive].float().cpu(), bins=30, range=(-8.0, 0.0)) \
        if alive.any() else (torch.zeros(30), torch.linspace(-8, 0, 31))
    res = {
        "layer": L, "n_tokens": n_rows, "n_sequences": int(len(idx)), "n_documents": int(len(np.unique(docs))),
        "l0": acc["l0"] / n_rows,
        "fve": 1 - acc["sq_err"] / max(var, 1e-12), "nmse": acc["sq_err"] / max(acc["sq_norm"], 1e-12),
        "mse": acc["sq_err"] / n_rows, "cosine": acc["cos"] / n_rows, "l2_ratio": acc["ratio"] / n_rows,
        "dead_frac": float((~alive).float().mean()), "dense_frac": float((freq > DENSE).float().mean()),
        "density_hist": {"log10_freq_edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in hist_counts]},
    }
    if splice:
        seq = {k: torch.cat(v).numpy() for k, v in per_seq.items()}
        seq["n"] = np.full(len(idx), corpus.seq_len - 2, dtype=np.float64)
        seq["doc"] = docs
        n_pred = float(seq["n"].sum())
        # cluster by document: per-document sums (a document's sequences are resampled together)
        uniq, inv = np.unique(docs, return_inverse=True)
        per_doc = {k: np.bincount(inv, weights=seq[k], minlength=len(uniq)) for k in PER_SEQ_KEYS + ("n",)}
        rec = recovered_scores(per_doc, n_boot=n_boot, seed=seed, min_effect=min_effect)
        res.update({
            "ce_clean": seq["ce_clean"].sum() / n_pred, "ce_sae": seq["ce_sae"].sum() / n_pred,
            "ce_zero_ablation": seq["ce_zero"].sum() / n_pred, "ce_mean_ablation": seq["ce_mean"].sum() / n_pred,
            "kl_sae": seq["kl_sae"].sum() / n_pred, "kl_zero_ablation": seq["kl_zero"].sum() / n_pred,
            "kl_mean_ablation": seq["kl_mean"].sum() / n_pred,
            "n_predictions": int(n_pred),
        })
        for key in ("kl_recovered_zero", "kl_recovered_mean", "ce_recovered_zero", "ce_recovered_mean"):
            res[key] = rec[key]["value"]
        res["recovered"] = rec
        res["ci"] = {"method": "paired BCa bootstrap over documents (scipy.stats.bootstrap)", "level": LEVEL,
                     "n_boot": n_boot, "seed": seed, "clusters": int(len(uniq)), "min_effect": min_effect}
        res["_per_seq"] = seq
    res["_counts"] = counts.cpu()
    return res

def plot_density(res: dict, path) -> None:
    """Bar plot of the log10 firing-frequency histogram to ``path`` (PNG), written atomically."""
    import io
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..runs import atomic_write_bytes
    h = res["density_hist"]
    e = h["log10_freq_edges"]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(e[:-1], h["counts"], width=e[1] - e[0], align="edge")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("features")
    ax.set_title(f"layer {res['layer']}: L0 {res['l0']:.1f}, dead {res['dead_frac']:.1%}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


SUMMARY_KEYS = ("name", "layer", "n_tokens", "n_documents", "l0", "fve", "dead_frac", "dense_frac", "ce_recovered_zero",
                "ce_recovered_mean", "kl_recovered_zero", "kl_recovered_mean")


def run_eval(model: Model, run: RunDir, opts: EvalOptions, progress: bool = True) -> dict:
    """Evaluate SAE ``opts.name`` of the run directory on held-out tokens; writes :func:`eval_outputs`
    into ``sae/<name>/``: ``eval.json`` (written last), ``sparsity.safetensors``,
    ``feature_counts.safetensors``, ``per_sequence.safetensors`` (the per-sequence sums behind the CIs:
    ``PER_SEQ_KEYS`` + ``doc``, ``n``, each [n_seq]) and ``eval_density.png``. Returns a small summary
    (``SUMMARY_KEYS`` + ``headline``)."""
    folder = sae_dir(run, opts.name)
    sae = load_sae(folder, model)
    tj = folder / "train.json"
    train_cfg = read_json(tj)["config"] if tj.is_file() else {}
    corpus_spec = opts.corpus or train_cfg.get("corpus", "default")
    sl = train_cfg.get("seq_len", sae.cfg.context_size)
    check(opts.n_tokens >= sl, f"--tokens {opts.n_tokens} is less than one sequence of {sl} tokens")
    tc = TokenCorpus(model, corpus_spec, seq_len=sl)
    res = evaluate_sae(model, sae, tc, n_tokens=opts.n_tokens, batch_size=opts.batch_size, progress=progress,
                       mean_tokens=opts.mean_tokens, n_boot=opts.n_boot, min_effect=opts.min_effect, seed=opts.seed)
    counts = res.pop("_counts")
    seq = res.pop("_per_seq")
    res.update({"name": opts.name, "corpus": corpus_spec, "requested_tokens": opts.n_tokens})
    freq = counts.double() / res["n_tokens"]
    write_tensors(folder / "sparsity.safetensors", {"sparsity": torch.log10(freq.clamp_min(1e-10)).float()})
    write_tensors(folder / "feature_counts.safetensors", {"counts": counts, "n_tokens": torch.tensor([res["n_tokens"]])})
    write_tensors(folder / "per_sequence.safetensors", {k: torch.from_numpy(np.asarray(v, dtype=np.float64))
                                                        for k, v in seq.items()})
    plot_density(res, folder / "eval_density.png")
    write_json(folder / "eval.json", res)   # last: the summary of the files above
    return {k: res.get(k) for k in SUMMARY_KEYS} | {"headline": res["recovered"]["headline"]}
