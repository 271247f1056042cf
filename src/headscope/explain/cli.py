"""``headscope explain run|score|compare|baseline``: written explanations of (neuron, head) pairs,
their scores on held-out prompts, and the random-neuron baseline."""

from __future__ import annotations

import os
from pathlib import Path

from ..cli import add_model_args, add_out_arg, load_from_args


def _backend_args(p):
    p.add_argument("--backend", default="statistical", choices=("statistical", "openai", "local"),
                   help="statistical: offline sparse logistic regression over n-grams; openai: any OpenAI-compatible endpoint; "
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
    p.add_argument("--max-terms", type=int, default=5, help="statistical backend: terms of the rule (default: %(default)s)")


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
    s.add_argument("--max-per-class", type=int, default=20, help="held-out prompts per class and pair (balanced)")
    s.add_argument("--min-per-class", type=int, default=5, help="score a pair only with this many of each class")
    s.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the shuffled-explanation control (it doubles the scorer's calls)")
    s.set_defaults(func=_score)
    c = es.add_parser("compare", help="E of congruent vs random neurons: mean, std, skew, Mann–Whitney, KS")
    add_out_arg(c)
    c.add_argument("--scores", default="statistical", help="which backend's scores (default: %(default)s)")
    c.set_defaults(func=_compare)
    b = es.add_parser("baseline", help="the random-neuron baseline through the same pipeline, then compare")
    add_model_args(b); add_out_arg(b); _backend_args(b)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--per-layer", type=int, default=None)
    b.add_argument("--force", action="store_true")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=_baseline)


def _options(args, dry_run=None) -> dict:
    return {"base_url": args.base_url, "llm": args.llm, "api_key_env": args.api_key_env,
            "concurrency": args.concurrency, "max_retries": args.max_retries, "timeout": args.timeout,
            "cache_dir": Path(args.cache_dir) if args.cache_dir else None, "dry_run": dry_run,
            "local_model": args.explainer_model, "device": args.device, "max_terms": args.max_terms}


def _open(args):
    from ..runs import RunDir
    model = load_from_args(args)
    return model, RunDir(args.out, model.identity())


def _print_summary(s: dict, what: str) -> None:
    f = lambda x: "n/a" if x is None else f"{x:.3f}"
    bn = s.get("by_neuron", s)
    line = (f"{what}: {s.get('n', 0)} pairs scored ({s.get('skipped', 0)} skipped: too few held-out prompts of a "
            f"class); E mean {f(bn.get('mean'))} [{f(bn.get('low'))}, {f(bn.get('high'))}] over {bn.get('n', 0)} neurons")
    if "significant_bh" in s:
        line += f"; {s['significant_bh']} pairs above chance (BH q < 0.05)"
    if "control" in s:
        c = s["control"]["by_neuron"]
        line += f"; shuffled explanations {f(c.get('mean'))} [{f(c.get('low'))}, {f(c.get('high'))}]"
    print(line)


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
    s = run_score(model, run, backend, args.which, explanations=args.explanations,
                  max_per_class=args.max_per_class, min_per_class=args.min_per_class, control=args.control,
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
    mw, ks, dm = res["mann_whitney"], res["ks"], res["difference_of_means"]
    f = lambda x: "n/a" if x is None else f"{x:.3g}"
    print(f"per neuron: congruent − random = {f(dm['diff'])} [{f(dm['low'])}, {f(dm['high'])}]; Mann–Whitney U = "
          f"{f(mw['U'])}, p = {f(mw['p'])}; KS D = {f(ks['D'])}, p = {f(ks['p'])}")


def _baseline(args) -> int:
    from .stages import make_backend, run_random_baseline
    model, run = _open(args)
    backend = make_backend(args.backend, run, model, **_options(args))
    _report(run_random_baseline(model, run, backend, seed=args.seed, per_layer=args.per_layer, force=args.force,
                                progress=not args.quiet))
    return 0
