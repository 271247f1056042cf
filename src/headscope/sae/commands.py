"""``headscope sae cache|sweep|dfa``: commands ``fn(model, run, opts)`` (declared in sae/instrument.py, their
options in sae/options.py)."""

from __future__ import annotations

import json

from ..errors import HeadscopeError


def _print(obj) -> None:
    print(json.dumps(obj, indent=1))


def cmd_cache(model, run, opts) -> int:
    from ..sites import parse_layers
    from ..data import TokenCorpus
    from .store import cache_activations
    layers = parse_layers(opts.layers, model.n_layers)
    corpus = TokenCorpus(model, opts.corpus, seq_len=opts.seq_len)
    man = cache_activations(model, corpus, layers, opts.dir, max_tokens=opts.tokens, shard_tokens=opts.shard_tokens)
    _print({k: man[k] for k in ("layers", "shards", "tokens_per_shard", "d_in")})
    return 0


def cmd_sweep(model, run, opts) -> int:
    from .sweep import run_sweep
    res = run_sweep(model, run, opts)
    _print(res["points"])
    return 0


def cmd_dfa(model, run, opts) -> int:
    from .attribution import dfa, recursive_dfa
    from .io import load_sae
    from .train import sae_dir
    sae = load_sae(sae_dir(run, opts.name), model)
    if not 0 <= opts.feature < sae.cfg.d_sae:
        raise HeadscopeError(f"--feature {opts.feature} does not exist: SAE {opts.name} has features 0..{sae.cfg.d_sae - 1}")
    ids = model.to_tokens(opts.prompt)
    S = ids.shape[1]
    t = opts.dest if opts.dest >= 0 else S + opts.dest
    if not 0 <= t < S:
        raise HeadscopeError(f"--dest {opts.dest} is out of range for a prompt of {S} tokens")
    d = dfa(model, sae, ids, features=[opts.feature], dest=t)[0, 0, :, :, 0]     # [S, H]
    toks = model.token_str(ids[0].tolist())
    out = {"dest": t, "dest_token": toks[t], "feature": opts.feature,
           "sources": [{"pos": s, "token": toks[s], "dfa": round(float(d[s].sum()), 4),
                        "per_head": [round(float(x), 4) for x in d[s]]} for s in range(t + 1)]}
    if opts.recursive:
        r = recursive_dfa(model, sae, ids[0], t, opts.feature)
        out["recursive"] = [{"component": n, "pos": p, "token": toks[p], "value": round(v, 4)} for n, p, v in r.top(opts.top)]
    _print(out)
    return 0
