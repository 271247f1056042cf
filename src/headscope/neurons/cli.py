"""``headscope neurons find|mine|attribute|ablate``: the head → neuron look-ups of Neo et al."""

from __future__ import annotations

from ..cli import add_model_args, add_out_arg, load_from_args, parse_layers


def _common(p, corpus: bool = False):
    add_model_args(p)
    add_out_arg(p)
    p.add_argument("--set", dest="which", default="top", choices=("top", "random"),
                   help="neuron set: congruent neurons (top) or the random-neuron baseline (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="recompute even if the artifact is current")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(sub) -> None:
    p = sub.add_parser("neurons", help="next-token neurons, their max-activating prompts and the heads that drive them")
    ns = p.add_subparsers(dest="neurons_command", metavar="SUBCOMMAND", required=True)

    f = ns.add_parser("find", help="next-token neurons by congruence of W_out with W_U",
                      description="Ranks MLP neurons by the congruence of their output weight with the unembedding "
                                  "(dot, cosine, kurtosis, skew); writes RUN/neurons/find.json.")
    _common(f)
    f.add_argument("--layers", default=None, help="layers to search (default: the last --last-k layers)")
    f.add_argument("--last-k", type=int, default=3, help="search the last K layers (default: %(default)s)")
    f.add_argument("--per-layer", type=int, default=20, help="neurons per layer (default: %(default)s)")
    f.add_argument("--rank-by", default="dot", choices=("dot", "cos", "kurtosis", "skew"))
    f.add_argument("--kind", default="prediction", choices=("prediction", "suppression"))
    f.add_argument("--no-require-space", dest="require_space", action="store_false",
                   help="do not require the token to start with a space")
    f.add_argument("--min-chars", type=int, default=3, help="minimum characters of the token (default: %(default)s)")
    f.add_argument("--reject-file", default=None, help="file of tokens to reject, one per line (replaces the built-in list)")
    f.add_argument("--seed", type=int, default=0, help="seed of the random set")
    f.add_argument("--unembed", default="centred", choices=("centred", "raw"),
                   help="W_U centred over the vocabulary (TransformerLens' center_unembed; default) or raw")
    f.set_defaults(func=_find)

    m = ns.add_parser("mine", help="max-activating prompts per neuron (train and held-out)",
                      description="One forward pass over the corpus serves every neuron; prompts end at the "
                                  "activating token and are trimmed to the shortest suffix keeping --keep of the "
                                  "activation. Writes RUN/neurons/mine.json.")
    _common(m)
    m.add_argument("--corpus", default="default", help="corpus spec (see headscope.data; default: %(default)s)")
    m.add_argument("--seq-len", type=int, default=128)
    m.add_argument("--top-k", type=int, default=20, help="train prompts per neuron (default: %(default)s)")
    m.add_argument("--top-k-test", type=int, default=20, help="held-out prompts per neuron (default: %(default)s)")
    m.add_argument("--keep", type=float, default=0.8, help="fraction of the activation trimming keeps (default: %(default)s)")
    m.add_argument("--max-prompt-tokens", type=int, default=100, help="drop longer trimmed prompts (default: %(default)s)")
    m.add_argument("--max-tokens", type=int, default=None, help="mine at most this many tokens per split")
    m.add_argument("--batch-size", type=int, default=16)
    m.set_defaults(func=_mine)

    a = ns.add_parser("attribute", help="head → neuron attribution; active heads; pairs to explain",
                      description="A = <head result, folded neuron input direction> at the prompt's last token "
                                  "for every eligible head; active when A > mean + 2σ. Writes "
                                  "RUN/neurons/attribution.json and attribution.safetensors.")
    _common(a)
    a.add_argument("--gated", default="full", choices=("full", "gate", "up"), help="gated MLPs: first-order term(s)")
    a.add_argument("--no-norm-scale", dest="norm_scale", action="store_false", help="do not divide by the norm's σ")
    a.add_argument("--k-sigma", type=float, default=2.0, help="active: A > mean + K·σ (default: %(default)s)")
    a.add_argument("--low", type=float, default=0.25, help="explain heads active on ≥ LOW of prompts")
    a.add_argument("--high", type=float, default=0.75, help="explain heads active on ≤ HIGH of prompts")
    a.add_argument("--batch-size", type=int, default=32)
    a.set_defaults(func=_attribute)

    b = ns.add_parser("ablate", help="drop in P(token) when a head is zeroed, active vs inactive prompts, per pair and neuron")
    _common(b)
    b.add_argument("--max-pairs", type=int, default=None, help="ablate at most this many pairs")
    b.add_argument("--mode", default="z", choices=("z", "value"),
                   help="zero the head's z slice, or its KV group's values (GQA: all heads of the group)")
    b.add_argument("--batch-size", type=int, default=32)
    b.set_defaults(func=_ablate)


def _open(args):
    from ..runs import RunDir
    model = load_from_args(args)
    return model, RunDir(args.out, model.identity())


def _find(args) -> int:
    from ..errors import HeadscopeError
    from .stages import run_find
    model, run = _open(args)
    layers = parse_layers(args.layers, model.n_layers) if args.layers else None
    reject = None
    if args.reject_file:
        from pathlib import Path
        p = Path(args.reject_file)
        if not p.is_file():
            raise HeadscopeError(f"reject file not found: {p}")
        reject = [line.rstrip("\n") for line in p.read_text().splitlines() if line.strip()]
    res = run_find(model, run, args.which, layers=layers, last_k=args.last_k, per_layer=args.per_layer,
                   rank_by=args.rank_by, kind=args.kind, require_space=args.require_space, min_chars=args.min_chars,
                   reject=reject, seed=args.seed, unembed=args.unembed, force=args.force)
    from ..runs import read_json
    from .stages import set_dir
    found = read_json(set_dir(run, args.which) / "find.json")["neurons"]
    print(f"{len(found)} {args.which} neurons in {set_dir(run, args.which) / 'find.json'}"
          + (" (already there)" if res.get("skipped") else ""))
    for n in found[:10]:
        print(f"  L{n['layer']}.N{n['neuron']}  token {n['token']!r}  dot {n['dot']:.3f}  cos {n['cos']:.3f}  "
              f"kurtosis {n['kurtosis']:.1f}  skew {n['skew']:.2f}")
    return 0


def _mine(args) -> int:
    from .stages import run_mine
    model, run = _open(args)
    res = run_mine(model, run, args.which, corpus=args.corpus, seq_len=args.seq_len, top_k=args.top_k,
                   top_k_test=args.top_k_test, keep=args.keep, max_prompt_tokens=args.max_prompt_tokens,
                   batch_size=args.batch_size, max_tokens=args.max_tokens, force=args.force, progress=not args.quiet)
    print(f"mined {res['train_prompts']} train and {res['test_prompts']} held-out prompts for {res['neurons']} neurons"
          f" (mean length {res['mean_prompt_tokens'] or 0:.1f} tokens)")
    return 0


def _attribute(args) -> int:
    from .stages import run_attribute
    model, run = _open(args)
    res = run_attribute(model, run, args.which, gated=args.gated, norm_scale=args.norm_scale, k_sigma=args.k_sigma,
                        low=args.low, high=args.high, batch_size=args.batch_size, force=args.force,
                        progress=not args.quiet)
    print(f"{res['pairs']} (neuron, head) pairs to explain" +
          (f" over {res['neurons_with_pairs']} neurons" if "neurons_with_pairs" in res else ""))
    return 0


def _ablate(args) -> int:
    from .stages import run_ablate
    model, run = _open(args)
    res = run_ablate(model, run, args.which, max_pairs=args.max_pairs, mode=args.mode, batch_size=args.batch_size, force=args.force,
                     progress=not args.quiet)
    fmt = lambda x: "n/a" if x is None else f"{x:.4g}"
    print(f"{res['pairs']} pairs over {res['neurons']} neurons; per-neuron effect (mean drop active − inactive) "
          f"{fmt(res['effect']['mean'])} [{fmt(res['effect']['low'])}, {fmt(res['effect']['high'])}], Wilcoxon p = "
          f"{fmt(res['wilcoxon']['p'])}; {res['significant_bh']} pairs significant (Mann–Whitney, BH q < 0.05)")
    if "vs_random" in res:
        v = res["vs_random"]
        print(f"random neurons: effect {fmt(v['random']['mean'])}; congruent − random {fmt(v['difference']['diff'])} "
              f"[{fmt(v['difference']['low'])}, {fmt(v['difference']['high'])}], Mann–Whitney p = {fmt(v['mann_whitney']['p'])}")
    return 0
