"""Evaluating an attention-output SAE on held-out tokens: ``run_eval(model, run, name) -> dict``.

Metrics (N held-out tokens, positions ≥ 1: z at the BOS position 0 is a constant kept exact, see
:mod:`headscope.sae.store`):

* ``l0``: mean number of active features per token.
* ``fve``: fraction of variance explained, 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄ the mean z over the eval tokens).
* ``nmse``: Σ‖x − x̂‖² / Σ‖x‖²; ``cosine``: mean cos(x, x̂); ``l2_ratio``: mean ‖x̂‖ / ‖x‖.
* CE loss recovered: the reconstruction x̂ is spliced into the forward pass in place of z (a capture
  ``patch`` intervention at the output-projection input), and compared with ablating z:
  ``ce_recovered_zero = (CE_zero − CE_sae) / (CE_zero − CE_clean)`` and the same against
  mean-ablation (z ← the mean z of the train split, per head): a stronger baseline, since zeroing z can
  be so destructive that any reconstruction looks good.
* KL recovered: ``1 − KL(p_clean ‖ p_sae) / KL(p_clean ‖ p_ablated)`` (zero and mean).
* ``dead_frac``: features that never fire on the eval tokens; ``dense_frac``: features firing on more
  than 10 % of tokens; ``density_hist``: histogram of log10 firing frequency (dead features left out).

Writes ``sae/<name>/eval.json``, ``sae/<name>/sparsity.safetensors`` (SAELens: key ``sparsity``, log10
frequency) and ``sae/<name>/eval_density.png``.
"""

from __future__ import annotations

import math
import sys

import torch

from ..capture import HeadIntervention, capture
from ..data import TokenCorpus
from ..errors import HeadscopeError
from ..models.load import Model
from ..runs import RunDir, read_json, write_json, write_tensors
from .io import load_sae
from .model import AttnSAE
from .train import sae_dir

DENSE = 0.1


@torch.no_grad()
def mean_z(model: Model, corpus: TokenCorpus, layer: int, n_tokens: int = 16384, batch_size: int = 8) -> torch.Tensor:
    """Mean z of ``layer`` over positions ≥ 1 of the first ``n_tokens`` train tokens, [H, Dh]."""
    total, n = None, 0
    for ids in corpus.batches("train", batch_size, max_tokens=n_tokens):
        z = capture(model, ids, layers=[layer], what=("z",), stop_after=layer)["z"][layer][:, 1:].double()
        s = z.sum((0, 1))
        total = s if total is None else total + s
        n += z.shape[0] * z.shape[1]
    return (total / max(n, 1)).float()


def _ce(lp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over positions 0..S−2."""
    return -lp[:, :-1].gather(-1, ids[:, 1:, None].to(lp.device)).sum()


def _kl(lp_clean: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """Summed KL(p_clean ‖ p) over positions."""
    return (lp_clean.exp() * (lp_clean - lp)).sum()


@torch.no_grad()
def evaluate_sae(model: Model, sae: AttnSAE, corpus: TokenCorpus, n_tokens: int = 8192, batch_size: int = 4,
                 mean: torch.Tensor | None = None, splice: bool = True, progress: bool = True,
                 mean_tokens: int = 16384) -> dict:
    """Metrics of ``sae`` on the first ``n_tokens`` held-out tokens (see module docstring).

    ``mean``: mean z [H, Dh] for the mean-ablation baseline (if None: from the first ``mean_tokens``
    tokens of the train split).
    ``splice=False`` skips the three extra forward passes (reconstruction metrics only).
    Returns a JSON-ready dict; ``feature_counts`` (a [F] tensor of firing counts) is added under ``_counts``.
    """
    from tqdm import tqdm
    L, dev = sae.cfg.layer, model.device
    sae = sae.to(dev).eval()
    H, Dh = model.n_heads, model.d_head
    if splice and mean is None:
        mean = mean_z(model, corpus, L, n_tokens=mean_tokens)
    F = sae.cfg.d_sae
    acc = {k: 0.0 for k in ("sq_err", "sq_norm", "cos", "ratio", "l0", "ce_clean", "ce_sae", "ce_zero", "ce_mean",
                            "kl_sae", "kl_zero", "kl_mean")}
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64, device=dev)
    counts = torch.zeros(F, dtype=torch.long, device=dev)
    n_rows, n_pred = 0, 0
    n_batches = max(1, math.ceil(min(n_tokens, corpus.n_sequences("heldout") * corpus.seq_len) / (corpus.seq_len * batch_size)))
    for ids in tqdm(corpus.batches("heldout", batch_size, max_tokens=n_tokens), total=n_batches, file=sys.stderr,
                    desc=f"eval SAE layer {L}", disable=not progress, unit=" batch"):
        ids = ids.to(dev)
        what = ("z", "logprobs") if splice else ("z",)
        cap = capture(model, ids, layers=[L], what=what, stop_after=None if splice else L)
        z = cap["z"][L]
        x = z[:, 1:].reshape(-1, H * Dh).float()
        if not torch.isfinite(x).all():
            raise HeadscopeError(f"non-finite z activations at layer {L} in the eval data")
        o = sae(x)
        err = (o.recon - x).pow(2).sum(-1)
        acc["sq_err"] += err.sum().item()
        acc["sq_norm"] += x.pow(2).sum().item()
        acc["cos"] += torch.nn.functional.cosine_similarity(o.recon, x, dim=-1).sum().item()
        acc["ratio"] += (o.recon.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum().item()
        active = o.acts > 0
        acc["l0"] += active.sum().item()
        counts += active.sum(0)
        sum_x += x.double().sum(0)
        n_rows += x.shape[0]
        if splice:
            zhat = z.clone()
            zhat[:, 1:] = o.recon.reshape(z.shape[0], z.shape[1] - 1, H, Dh).to(z.dtype)
            lp_clean = cap.logprobs
            runs = {
                "sae": [HeadIntervention(L, kind="patch", value=zhat)],
                "zero": [HeadIntervention(L, kind="zero", positions=slice(1, None))],
                "mean": [HeadIntervention(L, kind="mean", value=mean.to(dev, z.dtype), positions=slice(1, None))],
            }
            acc["ce_clean"] += _ce(lp_clean, ids).item()
            for key, ivs in runs.items():
                lp = capture(model, ids, layers=[], what=("logprobs",), interventions=ivs).logprobs
                acc[f"ce_{key}"] += _ce(lp, ids).item()
                acc[f"kl_{key}"] += _kl(lp_clean[:, :-1], lp[:, :-1]).item()
                del lp
            n_pred += ids.shape[0] * (ids.shape[1] - 1)
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
        "layer": L, "n_tokens": n_rows, "l0": acc["l0"] / n_rows,
        "fve": 1 - acc["sq_err"] / max(var, 1e-12), "nmse": acc["sq_err"] / max(acc["sq_norm"], 1e-12),
        "mse": acc["sq_err"] / n_rows, "cosine": acc["cos"] / n_rows, "l2_ratio": acc["ratio"] / n_rows,
        "dead_frac": float((~alive).float().mean()), "dense_frac": float((freq > DENSE).float().mean()),
        "density_hist": {"log10_freq_edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in hist_counts]},
    }
    if splice:
        ce = {k: acc[f"ce_{k}"] / n_pred for k in ("clean", "sae", "zero", "mean")}
        kl = {k: acc[f"kl_{k}"] / n_pred for k in ("sae", "zero", "mean")}

        def rec(base, val, clean):
            d = base - clean
            return (base - val) / d if abs(d) > 1e-9 else None
        res.update({
            "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero_ablation": ce["zero"], "ce_mean_ablation": ce["mean"],
            "ce_recovered_zero": rec(ce["zero"], ce["sae"], ce["clean"]),
            "ce_recovered_mean": rec(ce["mean"], ce["sae"], ce["clean"]),
            "kl_sae": kl["sae"], "kl_zero_ablation": kl["zero"], "kl_mean_ablation": kl["mean"],
            "kl_recovered_zero": 1 - kl["sae"] / kl["zero"] if kl["zero"] > 1e-12 else None,
            "kl_recovered_mean": 1 - kl["sae"] / kl["mean"] if kl["mean"] > 1e-12 else None,
            "n_predictions": n_pred,
        })
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


def run_eval(model: Model, run: RunDir, name: str, *, n_tokens: int = 8192, batch_size: int = 4, corpus: str | None = None,
             seq_len: int | None = None, progress: bool = True, force: bool = False, mean_tokens: int = 16384) -> dict:
    """Evaluate SAE ``name`` of the run directory on held-out tokens; writes ``eval.json``,
    ``sparsity.safetensors`` and ``eval_density.png`` into ``sae/<name>/``. Returns the metrics."""
    folder = sae_dir(run, name)
    stage = f"sae/{name}/eval"
    if not force and run.is_done(stage) and (folder / "eval.json").is_file():
        old = read_json(folder / "eval.json")
        if old.get("requested_tokens") == n_tokens:
            return old
    sae = load_sae(folder, model)
    tj = folder / "train.json"
    train_cfg = read_json(tj)["config"] if tj.is_file() else {}
    corpus_spec = corpus or train_cfg.get("corpus", "default")
    sl = seq_len or train_cfg.get("seq_len", sae.cfg.context_size)
    tc = TokenCorpus(model, corpus_spec, seq_len=sl)
    res = evaluate_sae(model, sae, tc, n_tokens=n_tokens, batch_size=batch_size, progress=progress,
                       mean_tokens=mean_tokens)
    counts = res.pop("_counts")
    res.update({"name": name, "corpus": corpus_spec, "requested_tokens": n_tokens})
    freq = counts.double() / res["n_tokens"]
    write_tensors(folder / "sparsity.safetensors", {"sparsity": torch.log10(freq.clamp_min(1e-10)).float()})
    write_tensors(folder / "feature_counts.safetensors", {"counts": counts, "n_tokens": torch.tensor([res["n_tokens"]])})
    write_json(folder / "eval.json", res)
    plot_density(res, folder / "eval_density.png")
    run.mark_done(stage, {k: res.get(k) for k in ("l0", "fve", "ce_recovered_zero", "ce_recovered_mean")})
    return res
