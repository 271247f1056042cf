"""``headscope explain run|score|compare|baseline``: written explanations of (neuron, head) pairs,
their scores on held-out prompts, and the random-neuron baseline; ``explain features|score-features``:
the same for SAE features (detection and fuzzing beside shuffled explanations); ``explain label``: a
one-line label per head from what headscope measured."""

from __future__ import annotations

import os
from pathlib import Path

from ..cli import add_model_args, add_out_arg, load_from_args


def _backend_args(p):
    p.add_argument("--backend", default="keyword", choices=("keyword", "openai", "local"),
                   help="keyword: offline n-gram baseline; openai: any OpenAI-compatible endpoint; "
                        "local: a Hugging Face chat model in-process (default: %(default)s)")
    p.add_argument("--base-url", default=os.environ.get("HEADSCOPE_BASE_URL", "https://api.openai.com/v1"),
                   help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 for vLLM (default: %(default)s)")
    p.add_argument("--llm", default=os.environ.get("HEADSCOPE_LLM", "gpt-4o"), help="model name at the endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default: %(default)s)")
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--cache-dir", default=None, help="response cache (default: RUN/explain/cache)")
    p.add_argument("--explainer-model", default="default", help="local backend: model spec (default: the embedded model)")
    p.add_argument("--keywords", type=int, default=3, help="keyword backend: n-grams per explanation")


def _common(p):
    add_model_args(p)
    add_out_arg(p)
    p.add_argument("--set", dest="which", default="top", choices=("top", "random"))
    p.add_argument("--force", action="store_true")
    p.add_argument("--quiet", action="store_true")


def register(sub) -> None:
    p = sub.add_parser("explain", help="explain and score when each head drives a neuron")
    es = p.add_subparsers(dest="explain_command", metavar="SUBCOMMAND", required=True)
    r = es.add_parser("run", help="explain each (neuron, head) pair from its active and inactive train prompts")
    _common(r); _backend_args(r)
    r.add_argument("--max-pairs", type=int, default=None)
    r.add_argument("--max-examples", type=int, default=10, help="active and inactive examples shown, each")
    r.add_argument("--dry-run", default=None, metavar="JSONL",
                   help="openai backend: write the requests to JSONL and estimate tokens; send nothing")
    r.set_defaults(func=_run)
    s = es.add_parser("score", help="classify held-out prompts from the explanation alone; E = (TPR+TNR)/2")
    _common(s); _backend_args(s)
    s.add_argument("--explanations", default=None, help="score another backend's explanations (default: the scorer's)")
    s.add_argument("--max-test", type=int, default=20, help="held-out prompts per pair")
    s.set_defaults(func=_score)
    c = es.add_parser("compare", help="E of congruent vs random neurons: mean, std, skew, Mann–Whitney, KS")
    add_out_arg(c)
    c.add_argument("--scores", default="keyword", help="which backend's scores (default: %(default)s)")
    c.set_defaults(func=_compare)
    b = es.add_parser("baseline", help="the random-neuron baseline through the same pipeline, then compare")
    add_model_args(b); add_out_arg(b); _backend_args(b)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--per-layer", type=int, default=None)
    b.add_argument("--force", action="store_true")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=_baseline)
    from .features import FeatureExplainOptions, FeatureScoreOptions
    f = es.add_parser("features", help="explain SAE features from max-activating and random held-out contexts")
    _dataclass_args(f, FeatureExplainOptions); _client_args(f); add_model_args(f); add_out_arg(f)
    f.add_argument("--dry-run", default=None, metavar="JSONL",
                   help="openai backend: write the requests to JSONL; send nothing")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=_features)
    g = es.add_parser("score-features", help="detection and fuzzing scores of feature explanations, beside "
                                             "shuffled explanations, with bootstrap CIs")
    _dataclass_args(g, FeatureScoreOptions); _client_args(g); add_model_args(g); add_out_arg(g)
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=_score_features)
    from .pair_scores import PairScoreOptions
    sp = es.add_parser("score-pairs", help="detection scores of (neuron, head) explanations beside shuffled "
                                          "explanations, with bootstrap CIs and AUROC")
    _dataclass_args(sp, PairScoreOptions); _client_args(sp); add_model_args(sp); add_out_arg(sp)
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=_score_pairs)
    from .head_label import LabelOptions
    lb = es.add_parser("label", help="a one-line label per head from what headscope measured (+ an LLM summary)")
    _dataclass_args(lb, LabelOptions); _client_args(lb); add_model_args(lb); add_out_arg(lb)
    lb.add_argument("--quiet", action="store_true")
    lb.set_defaults(func=_label)


def _dataclass_args(p, cls) -> None:
    """One --flag per field of an options dataclass (help: the string under the field)."""
    import ast
    import dataclasses
    import inspect
    import typing
    docs = {}
    try:
        body = ast.parse(inspect.getsource(cls)).body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = b.value.value
    except (OSError, TypeError):
        pass
    hints = typing.get_type_hints(cls)
    for fld in dataclasses.fields(cls):
        t, flag = hints[fld.name], "--" + fld.name.replace("_", "-")
        kw = {"default": fld.default, "help": (docs.get(fld.name, "") + " (default: %(default)s)").strip()}
        if typing.get_origin(t) is typing.Literal:
            kw["choices"] = typing.get_args(t)
        elif typing.get_origin(t) is list:
            kw |= {"nargs": "+", "type": typing.get_args(t)[0], "default": list(fld.default)}
        elif t is bool:
            kw["action"] = "store_true"
        else:
            kw["type"] = t
        p.add_argument(flag, dest=fld.name, **kw)


def _client_args(p) -> None:
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default: %(default)s)")
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--cache-dir", default=None, help="response cache (default: RUN/explain/cache)")


def _opts(args, cls):
    import dataclasses
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _client(args, dry_run=None) -> dict:
    return {"api_key_env": args.api_key_env, "concurrency": args.concurrency, "max_retries": args.max_retries,
            "timeout": args.timeout, "cache_dir": Path(args.cache_dir) if args.cache_dir else None,
            "dry_run": dry_run, "device": args.device}


def _fmt_ci(m: dict) -> str:
    if not m or m.get("mean") is None:
        return "n/a"
    ci = m.get("ci")
    return f"{m['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _features(args) -> int:
    from ..errors import HeadscopeError
    from .features import FeatureExplainOptions, make_feature_backend, run_explain_features
    opts = _opts(args, FeatureExplainOptions)
    if args.dry_run and opts.backend != "openai":
        raise HeadscopeError("--dry-run applies to --backend openai")
    model, run = _open(args)
    dry = Path(args.dry_run) if args.dry_run else None
    if dry is not None and dry.exists():
        dry.unlink()
    be = make_feature_backend(opts, run, model, **_client(args, dry))
    res = run_explain_features(model, run, opts, progress=not args.quiet, backend=be)
    if "dry_run" in res:
        print(f"dry run: {res['explain_requests']} explanation requests written to {res['dry_run']}")
    else:
        print(f"{res['features']} features of SAE {res['sae']} explained with the {res['backend']} backend")
    return 0


def _score_features(args) -> int:
    from .features import FeatureScoreOptions, make_feature_backend, run_score_features
    opts = _opts(args, FeatureScoreOptions)
    model, run = _open(args)
    be = make_feature_backend(opts, run, model, **_client(args))
    s = run_score_features(model, run, opts, progress=not args.quiet, backend=be)
    print(f"SAE {s['sae']}: judgements read from {s['probabilities']}")
    for kind in opts.scorers:
        k = s[kind]
        line = (f"{kind}: balanced accuracy {_fmt_ci(k['balanced_accuracy'])} vs shuffled explanations "
                f"{_fmt_ci(k['shuffled_balanced_accuracy'])} (difference {_fmt_ci(k['difference'])}, "
                f"{k['units']} features, {k['skipped']} skipped)")
        if k.get("auroc"):
            line += f"; AUROC {_fmt_ci(k['auroc'])} vs {_fmt_ci(k['shuffled_auroc'])}"
        print(line)
    return 0


def _score_pairs(args) -> int:
    from .pair_scores import PairScoreOptions, run_score_pairs
    opts = _opts(args, PairScoreOptions)
    model, run = _open(args)
    c = {k: v for k, v in _client(args).items() if k != "device"} | {"device": args.device}
    s = run_score_pairs(model, run, opts, progress=not args.quiet, client=c)
    k = s["detection"]
    line = (f"{opts.which} pairs, judgements from {s['probabilities']}: balanced accuracy "
            f"{_fmt_ci(k['balanced_accuracy'])} vs shuffled explanations {_fmt_ci(k['shuffled_balanced_accuracy'])} "
            f"(difference {_fmt_ci(k['difference'])}, {k['units']} pairs, {k['skipped']} skipped)")
    if k.get("auroc"):
        line += f"; AUROC {_fmt_ci(k['auroc'])} vs {_fmt_ci(k['shuffled_auroc'])}"
    print(line)
    return 0


def _label(args) -> int:
    from .head_label import LabelOptions, run_labels
    opts = _opts(args, LabelOptions)
    from ..runs import RunDir
    if opts.backend == "none":
        model, run = None, RunDir(args.out)
    else:
        model, run = _open(args)
    res = run_labels(model, run, opts, progress=not args.quiet, client=_client(args))
    print(f"{res['heads']} heads labelled ({res['summaries']} written summaries) -> {res['path']}")
    return 0


def _options(args, dry_run=None) -> dict:
    return {"base_url": args.base_url, "llm": args.llm, "api_key_env": args.api_key_env,
            "concurrency": args.concurrency, "max_retries": args.max_retries, "timeout": args.timeout,
            "cache_dir": Path(args.cache_dir) if args.cache_dir else None, "dry_run": dry_run,
            "local_model": args.explainer_model, "device": args.device, "keywords": args.keywords}


def _open(args):
    from ..runs import RunDir
    model = load_from_args(args)
    return model, RunDir(args.out, model.identity())


def _print_summary(s: dict, what: str) -> None:
    f = lambda x: "n/a" if x is None else f"{x:.3f}"
    print(f"{what}: {s.get('n', 0)} pairs scored ({s.get('skipped', 0)} skipped: test prompts all one class); "
          f"E mean {f(s.get('mean'))}, std {f(s.get('std'))}, skew {f(s.get('skew'))}")


def _run(args) -> int:
    from ..errors import HeadscopeError
    from .stages import make_backend, run_explain
    if args.dry_run and args.backend != "openai":
        raise HeadscopeError("--dry-run applies to --backend openai")
    model, run = _open(args)
    dry = Path(args.dry_run) if args.dry_run else None
    if dry is not None and dry.exists():
        dry.unlink()
    backend = make_backend(args.backend, run, model, **_options(args, dry))
    res = run_explain(model, run, backend, args.which, max_pairs=args.max_pairs, max_examples=args.max_examples,
                      force=args.force, progress=not args.quiet)
    if "dry_run" in res:
        print(f"dry run: {res['explain_requests']} explanation requests written to {res['dry_run']}; estimated "
              f"≈{res['explain_input_tokens']} input + ≤{res['explain_output_tokens_max']} output tokens to explain, "
              f"≈{res['score_input_tokens']} input + {res['score_output_tokens']} output tokens to score "
              f"({res['score_requests']} requests)")
    else:
        print(f"{res['pairs']} pairs explained ({res['new']} new) with the {backend.name} backend")
    return 0


def _score(args) -> int:
    from .stages import make_backend, run_score
    model, run = _open(args)
    backend = make_backend(args.backend, run, model, **_options(args))
    s = run_score(model, run, backend, args.which, explanations=args.explanations, max_test=args.max_test,
                  force=args.force, progress=not args.quiet)
    _print_summary(s, f"{args.which} neurons, {backend.name} scorer")
    return 0


def _compare(args) -> int:
    from ..runs import RunDir
    from .stages import run_compare
    run = RunDir(args.out)
    _report(run_compare(None, run, args.scores))
    return 0


def _report(res: dict) -> None:
    _print_summary(res["top"], "congruent neurons")
    _print_summary(res["random"], "random neurons")
    mw, ks = res["mann_whitney"], res["ks"]
    f = lambda x: "n/a" if x is None else f"{x:.3g}"
    print(f"Mann–Whitney U = {f(mw['U'])}, p = {f(mw['p'])}; KS D = {f(ks['D'])}, p = {f(ks['p'])}")


def _baseline(args) -> int:
    from .stages import make_backend, run_random_baseline
    model, run = _open(args)
    backend = make_backend(args.backend, run, model, **_options(args))
    _report(run_random_baseline(model, run, backend, seed=args.seed, per_layer=args.per_layer, force=args.force,
                                progress=not args.quiet))
    return 0
