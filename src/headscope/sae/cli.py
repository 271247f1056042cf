"""The bodies of ``headscope sae cache|sweep|dfa`` (declared, with their options, in sae/instrument.py)."""

from __future__ import annotations

import argparse
import json

from ..errors import HeadscopeError


def _run(a, model):
    from ..runs import RunDir
    return RunDir(a.out, model.identity())


def _print(obj) -> None:
    print(json.dumps(obj, indent=1))


def cmd_cache(model, a) -> int:
    from ..cli import parse_layers
    from ..data import TokenCorpus
    from .store import cache_activations
    layers = parse_layers(a.layers, model.n_layers)
    corpus = TokenCorpus(model, a.corpus, seq_len=a.seq_len)
    man = cache_activations(model, corpus, layers, a.dir, max_tokens=a.tokens, shard_tokens=a.shard_tokens)
    _print({k: man[k] for k in ("layers", "shards", "tokens_per_shard", "d_in")})
    return 0


def cmd_sweep(model, a) -> int:
    from .sweep import run_sweep
    opts = dict(architecture=a.architecture, n_tokens=a.n_tokens, batch_size=a.batch_size, expansion=a.expansion,
                corpus=a.corpus, cache=a.cache)
    res = run_sweep(model, _run(a, model), a.layer, values=list(a.values), eval_tokens=a.eval_tokens, **opts)
    _print(res["points"])
    return 0


def cmd_dfa(model, a) -> int:
    from .attribution import dfa, recursive_dfa
    from .io import load_sae
    from .train import sae_dir
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
