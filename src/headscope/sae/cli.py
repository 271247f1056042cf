"""``headscope sae …``: train, cache, eval, sweep, analyze, dfa, ioi."""

from __future__ import annotations

import argparse
import json

from ..cli import add_model_args, add_out_arg, load_from_args
from ..errors import HeadscopeError


def _train_args(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig
    d = TrainConfig(layer=0)
    from .model import TRAINABLE
    p.add_argument("--arch", choices=TRAINABLE, default=d.architecture,
                   help="standard: ReLU + L1 (the paper); topk: TopK with the AuxK dead-feature loss; jumprelu: "
                        "learned thresholds + L0 penalty; batchtopk: top k·batch; matryoshka_batchtopk: BatchTopK "
                        "with nested prefixes (default %(default)s)")
    p.add_argument("--expansion", type=int, default=d.expansion, help="d_sae = expansion · H·Dh (default %(default)s)")
    p.add_argument("--d-sae", type=int, default=None, help="number of features (overrides --expansion)")
    p.add_argument("--k", type=int, default=d.k, help="TopK: active features per token (default %(default)s)")
    p.add_argument("--l1", type=float, default=d.l1_coeff, help="standard: L1 coefficient on the normalised input")
    p.add_argument("--l0", type=float, default=d.l0_coeff, help="jumprelu: L0 coefficient (default %(default)s)")
    p.add_argument("--bandwidth", type=float, default=d.bandwidth,
                   help="jumprelu: straight-through estimator bandwidth (default %(default)s)")
    p.add_argument("--matryoshka-widths", default="",
                   help="matryoshka_batchtopk: comma-separated prefix widths (default d_sae/16,/8,/4,/2,d_sae)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="token rows per step and process")
    p.add_argument("--tokens", type=int, default=d.n_tokens, help="training tokens (default %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--resample-every", type=int, default=0, help="standard: resample dead features every N steps")
    p.add_argument("--init-b-dec", choices=("mean", "zero"), default=d.init_b_dec)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", default="default", help="corpus spec (see headscope.data)")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--buffer-tokens", type=int, default=d.buffer_tokens,
                   help="tokens in one shuffling block: bounds memory (default %(default)s)")
    p.add_argument("--cache", default=None, help="train from an activation cache written by `headscope sae cache`")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)


def _train_options(a) -> dict:
    return dict(architecture=a.arch, expansion=a.expansion, d_sae=a.d_sae, k=a.k, l1_coeff=a.l1, lr=a.lr,
                l0_coeff=a.l0, bandwidth=a.bandwidth, matryoshka_widths=a.matryoshka_widths,
                batch_size=a.batch_size, n_tokens=a.tokens, warmup_steps=a.warmup_steps,
                resample_every=a.resample_every, init_b_dec=a.init_b_dec, seed=a.seed, corpus=a.corpus,
                seq_len=a.seq_len, buffer_tokens=a.buffer_tokens, cache=a.cache, checkpoint_every=a.checkpoint_every)


def _run(a, model):
    from ..runs import RunDir
    return RunDir(a.out, model.identity())


def _print(obj) -> None:
    print(json.dumps(obj, indent=1))


def cmd_train(a) -> int:
    from ..distributed import Distributed
    from .train import run_train
    dist = Distributed()
    model = load_from_args(a)
    if dist.enabled:
        model.hf.to(dist.device(a.device))
    res = run_train(model, _run(a, model), a.layer, name=a.name, dist=dist, **_train_options(a))
    if dist.primary:
        _print({k: res[k] for k in ("name", "layer", "n_steps", "tokens", "tokens_per_s", "final") if k in res})
    dist.destroy()
    return 0


def cmd_cache(a) -> int:
    from ..cli import parse_layers
    from ..data import TokenCorpus
    from .store import cache_activations
    model = load_from_args(a)
    layers = parse_layers(a.layers, model.n_layers)
    corpus = TokenCorpus(model, a.corpus, seq_len=a.seq_len)
    man = cache_activations(model, corpus, layers, a.dir, max_tokens=a.tokens, shard_tokens=a.shard_tokens)
    _print({k: man[k] for k in ("layers", "shards", "tokens_per_shard", "d_in")})
    return 0


def cmd_eval(a) -> int:
    from .evaluate import run_eval
    model = load_from_args(a)
    res = run_eval(model, _run(a, model), a.name, n_tokens=a.tokens, batch_size=a.batch_size, force=a.force)
    _print({k: v for k, v in res.items() if k != "density_hist"})
    return 0


def cmd_sweep(a) -> int:
    from .sweep import run_sweep
    model = load_from_args(a)
    from .sweep import parse_grid
    if bool(a.values) == bool(a.grid):
        raise HeadscopeError("give either --values (one architecture, --arch) or --grid (several)")
    grid = parse_grid(a.grid) if a.grid else None
    try:
        values = [float(v) for v in a.values.split(",")] if a.values else None
    except ValueError:
        raise HeadscopeError(f"--values must be comma-separated numbers, got '{a.values}'") from None
    opts = _train_options(a)
    res = run_sweep(model, _run(a, model), a.layer, values=values, grid=grid, eval_tokens=a.eval_tokens, **opts)
    _print(res["points"])
    return 0


def cmd_analyze(a) -> int:
    from .analysis import run_analysis
    from .dashboards import run_dashboards
    model = load_from_args(a)
    run = _run(a, model)
    res = run_analysis(model, run, a.name)
    idx = run_dashboards(model, run, a.name, n_tokens=a.tokens)
    poly = sum(1 for h in res["heads"].values() if h["polysemantic"])
    _print({"heads": len(res["heads"]), "polysemantic_heads": poly, "dashboard_features": idx["alive"]})
    return 0


def cmd_dfa(a) -> int:
    from .attribution import dfa, recursive_dfa
    from .io import load_sae
    from .train import sae_dir
    model = load_from_args(a)
    run = _run(a, model)
    sae = load_sae(sae_dir(run, a.name), model)
    ids = model.to_tokens(a.prompt)
    S = ids.shape[1]
    t = a.dest if a.dest >= 0 else S + a.dest
    if not 0 <= t < S:
        raise HeadscopeError(f"--dest {a.dest} is out of range for a prompt of {S} tokens")
    d = dfa(model, sae, ids, features=[a.feature], dest=t)[0, 0, :, :, 0]     # [S, H]
    toks = model.token_str(ids[0].tolist())
    out = {"dest": t, "dest_token": toks[t], "feature": a.feature,
           "sources": [{"pos": s, "token": toks[s], "dfa": round(float(d[s].sum()), 4),
                        "per_head": [round(float(x), 4) for x in d[s]]} for s in range(t + 1)]}
    if a.recursive:
        r = recursive_dfa(model, sae, ids[0], t, a.feature)
        out["recursive"] = [{"component": n, "pos": p, "token": toks[p], "value": round(v, 4)} for n, p, v in r.top(a.top)]
    _print(out)
    return 0


def cmd_ioi(a) -> int:
    from .ioi import run_ioi
    model = load_from_args(a)
    res = run_ioi(model, _run(a, model), a.name, n_prompts=a.prompts)
    _print({k: v for k, v in res.items() if k != "features"} | {"top_features": res["features"][:5]})
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("sae", help="sparse autoencoders on attention outputs (z): train, evaluate, attribute")
    sub = p.add_subparsers(dest="sae_command", metavar="SAE_COMMAND")

    t = sub.add_parser("train", help="train an SAE on z of one layer (resumes; torchrun for several processes)")
    add_model_args(t), add_out_arg(t)
    t.add_argument("--layer", type=int, required=True)
    t.add_argument("--name", default=None, help="SAE name in the run directory (default L<layer>)")
    _train_args(t)
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("cache", help="run the model once and cache z of several layers to disk shards")
    add_model_args(c)
    c.add_argument("--layers", required=True, help="e.g. '3', '1,4', '2-5'")
    c.add_argument("--dir", required=True, help="cache folder")
    c.add_argument("--tokens", type=int, default=None, help="tokens to cache (default: the whole train split)")
    c.add_argument("--shard-tokens", type=int, default=65536)
    c.add_argument("--corpus", default="default")
    c.add_argument("--seq-len", type=int, default=128)
    c.set_defaults(func=cmd_cache)

    e = sub.add_parser("eval", help="L0, FVE, CE/KL recovered vs zero and mean ablation, density")
    add_model_args(e), add_out_arg(e)
    e.add_argument("--name", required=True)
    e.add_argument("--tokens", type=int, default=8192, help="held-out tokens (default %(default)s)")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--force", action="store_true", help="recompute even if done")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sweep", help="train SAEs of several architectures / sparsities from one activation cache "
                                     "and plot the L0 vs CE-recovered frontier")
    add_model_args(s), add_out_arg(s)
    s.add_argument("--layer", type=int, required=True)
    s.add_argument("--values", default=None, help="comma-separated values of --arch's sparsity knob: k (topk, "
                   "batchtopk, matryoshka_batchtopk), L0 coefficient (jumprelu) or L1 coefficient (standard)")
    s.add_argument("--grid", default=None, help="several architectures: 'topk:16,32 batchtopk:16,32 jumprelu:0.3,1'")
    s.add_argument("--eval-tokens", type=int, default=4096)
    _train_args(s)
    s.set_defaults(func=cmd_sweep)

    an = sub.add_parser("analyze", help="head attribution, per-head top features, polysemanticity, dashboards")
    add_model_args(an), add_out_arg(an)
    an.add_argument("--name", required=True)
    an.add_argument("--tokens", type=int, default=16384, help="held-out tokens scanned for dashboards")
    an.set_defaults(func=cmd_analyze)

    d = sub.add_parser("dfa", help="direct feature attribution of one feature on a prompt (and recursive DFA)")
    add_model_args(d), add_out_arg(d)
    d.add_argument("--name", required=True)
    d.add_argument("--feature", type=int, required=True)
    d.add_argument("--prompt", required=True)
    d.add_argument("--dest", type=int, default=-1, help="destination position (default: last)")
    d.add_argument("--recursive", action="store_true", help="also one step upstream through the value path")
    d.add_argument("--top", type=int, default=10)
    d.set_defaults(func=cmd_dfa)

    i = sub.add_parser("ioi", help="IOI worked example: features at S2 that matter for the logit difference")
    add_model_args(i), add_out_arg(i)
    i.add_argument("--name", required=True)
    i.add_argument("--prompts", type=int, default=100)
    i.set_defaults(func=cmd_ioi)

    p.set_defaults(func=lambda a: (p.print_help(), 1)[1])
