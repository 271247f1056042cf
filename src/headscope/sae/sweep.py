"""L0 sweep: train several SAEs on one layer (one activation pass, cached to disk) and plot the
L0 vs CE-recovered frontier. ``run_sweep(model, run, layer, values=[…], **train_options) -> dict``.

``values`` are k (TopK) or L1 coefficients (standard). The model runs once: z of the layer is cached
in ``sae/sweep_L<layer>/cache`` and every SAE trains from it. Writes ``sae/sweep_L<layer>/sweep.json``
(``points``: name, value, l0, fve, ce_recovered_zero, ce_recovered_mean, kl_recovered_zero) and
``sweep.png``.
"""

from __future__ import annotations

import io

from ..data import TokenCorpus
from ..errors import HeadscopeError
from ..models.load import Model
from ..runs import RunDir, atomic_write_bytes, write_json
from .evaluate import run_eval
from .store import cache_activations
from .train import TrainConfig, run_train


def run_sweep(model: Model, run: RunDir, layer: int, values: list[float], eval_tokens: int = 4096,
              progress: bool = True, **options) -> dict:
    if not values:
        raise HeadscopeError("sweep needs at least one value")
    arch = options.get("architecture", "topk")
    folder = run / f"sae/sweep_L{layer}"
    if not options.get("cache"):
        d = TrainConfig(layer=layer)
        corpus = TokenCorpus(model, options.get("corpus", d.corpus), seq_len=options.get("seq_len", d.seq_len))
        cache_activations(model, corpus, [layer], folder / "cache", max_tokens=options.get("n_tokens", d.n_tokens),
                          shard_tokens=options.get("buffer_tokens", d.buffer_tokens), progress=progress)
        options = {**options, "cache": str(folder / "cache")}
    points = []
    for v in values:
        if arch == "topk":
            if v != int(v) or v < 1:
                raise HeadscopeError(f"TopK sweep values must be positive integers (k), got {v}")
            opts, name = {**options, "k": int(v)}, f"L{layer}_k{int(v)}"
        else:
            opts, name = {**options, "l1_coeff": float(v)}, f"L{layer}_l1_{v:g}"
        run_train(model, run, layer, name=name, progress=progress, **opts)
        ev = run_eval(model, run, name, n_tokens=eval_tokens, corpus=options.get("corpus"), progress=progress)
        points.append({"name": name, "value": v, **{k: ev.get(k) for k in (
            "l0", "fve", "ce_recovered_zero", "ce_recovered_mean", "kl_recovered_zero", "dead_frac")}})
    res = {"layer": layer, "architecture": arch, "points": points}
    write_json(folder / "sweep.json", res)
    _plot(res, folder / "sweep.png")
    run.mark_done(f"sae/sweep_L{layer}", {"points": len(points)})
    return res


def _plot(res: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = sorted(res["points"], key=lambda p: p["l0"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (("ce_recovered_zero", "vs zero-ablation"), ("ce_recovered_mean", "vs mean-ablation")):
        xs = [p["l0"] for p in pts if p.get(key) is not None]
        ys = [p[key] for p in pts if p.get(key) is not None]
        ax.plot(xs, ys, "o-", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active features per token)")
    ax.set_ylabel("CE loss recovered")
    ax.set_title(f"layer {res['layer']} ({res['architecture']})")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
