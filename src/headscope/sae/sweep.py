"""L0 / fidelity frontier: train SAEs of several architectures and sparsity settings on one layer
from ONE cached activation pass, evaluate each, and plot L0 against CE loss recovered (vs zero- and
mean-ablation) per architecture.

``run_sweep(model, run, opts: SweepOptions, progress) -> dict`` (``headscope sae sweep``).
The value swept per architecture is its sparsity knob (:data:`KNOB`): k for TopK / BatchTopK /
Matryoshka, the L0 coefficient for JumpReLU, the L1 coefficient for standard SAEs. The model runs once:
z of the layer is cached in ``sae/sweep_L<layer>/cache`` (the fast path: every SAE trains from the
cache, no model forward) unless ``opts.cache`` names an existing one. Writes
``sae/sweep_L<layer>/sweep.json`` (``points``: name, architecture, value, l0, fve, ce_recovered_zero,
ce_recovered_mean, kl_recovered_zero, dead_frac, tokens_per_s) and ``sweep.png``.
"""

from __future__ import annotations

import io

from ..data import TokenCorpus
from ..errors import HeadscopeError
from ..models.load import Model
from ..runs import RunDir, atomic_write_bytes, write_json
from .architectures import REGISTRY
from .evaluate import run_eval
from .options import EvalOptions, SweepOptions, TrainOptions, parse_grid
from .store import cache_activations
from .train import run_train

KNOB = {name: a.sweep_knob for name, a in REGISTRY.items() if a.sweep_knob}
"""architecture -> (TrainOptions field swept, short name used in the SAE's name), from each architecture."""


def run_sweep(model: Model, run: RunDir, opts: SweepOptions, progress: bool = True) -> dict:
    """Train and evaluate one SAE per (architecture, value) of ``opts.grid`` (or ``opts.values`` of
    ``opts.architecture``); every SAE has the same training options (``lr``, ``n_tokens``, ``batch_size``,
    ``expansion``, ``seq_len``, ``corpus``, ``warmup_steps``, ``buffer_tokens``; the rest at
    :class:`TrainOptions`' defaults) but its sparsity knob."""
    grid = parse_grid(opts.grid) if opts.grid else {opts.architecture: list(opts.values)}
    layer = opts.layer
    jobs = []
    for arch, vals in grid.items():
        if arch not in KNOB:
            raise HeadscopeError(f"cannot sweep architecture '{arch}' (choose from {', '.join(KNOB)})")
        if not vals:
            raise HeadscopeError("sweep needs at least one value")
        field, short = KNOB[arch]
        for v in vals:
            if field == "k" and (v != int(v) or v < 1):
                raise HeadscopeError(f"{arch} sweep values must be positive integers (k), got {v}")
            if field != "k" and not v > 0:
                raise HeadscopeError(f"{arch} sweep values must be positive ({field}), got {v}")
            val = int(v) if field == "k" else float(v)
            jobs.append((arch, field, val, f"L{layer}_{short}{val:g}"))
    model.check_layer(layer)
    folder = run / f"sae/sweep_L{layer}"
    train = dict(layer=layer, lr=opts.lr, n_tokens=opts.n_tokens, batch_size=opts.batch_size,
                 expansion=opts.expansion, seq_len=opts.seq_len, corpus=opts.corpus, cache=opts.cache,
                 warmup_steps=opts.warmup_steps, buffer_tokens=opts.buffer_tokens)
    if not opts.cache:
        corpus = TokenCorpus(model, opts.corpus, seq_len=opts.seq_len)
        cache_activations(model, corpus, [layer], folder / "cache", max_tokens=opts.n_tokens,
                          shard_tokens=opts.buffer_tokens, progress=progress)
        train["cache"] = str(folder / "cache")
    points = []
    for arch, field, val, name in jobs:
        tr = run_train(model, run, TrainOptions(**train, name=name, architecture=arch, **{field: val}), progress)
        ev = run_eval(model, run, EvalOptions(name=name, n_tokens=opts.eval_tokens, corpus=opts.corpus),
                      progress=progress)
        points.append({"name": name, "architecture": arch, "value": val, "tokens_per_s": tr.get("tokens_per_s"),
                       **{k: ev.get(k) for k in ("l0", "fve", "ce_recovered_zero", "ce_recovered_mean",
                                                  "kl_recovered_zero", "dead_frac")}})
    res = {"layer": layer, "architectures": list(grid), "architecture": next(iter(grid)), "points": points,
           "train_tokens": opts.n_tokens, "eval_tokens": opts.eval_tokens}
    write_json(folder / "sweep.json", res)
    _plot(res, folder / "sweep.png")
    return res


def _plot(res: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=False)
    for ax, key, label in ((axes[0], "ce_recovered_zero", "vs zero-ablation"),
                           (axes[1], "ce_recovered_mean", "vs mean-ablation")):
        for arch in res["architectures"]:
            pts = sorted((p for p in res["points"] if p["architecture"] == arch and p.get(key) is not None
                          and p.get("l0")), key=lambda p: p["l0"])
            ax.plot([p["l0"] for p in pts], [p[key] for p in pts], "o-", label=arch)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("L0 (active features per token)")
        ax.set_ylabel(f"CE loss recovered {label}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"layer {res['layer']}: L0 / fidelity frontier ({res['train_tokens']:,} training tokens)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
