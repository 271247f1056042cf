"""``headscope heads score``: every head's induction, previous-token, duplicate-token and
prefix-induction scores as layer × head tables (JSON, safetensors, PNG heatmaps)."""

from __future__ import annotations

from ..cli import add_model_args, add_out_arg, load_from_args, parse_layers


def register(sub) -> None:
    p = sub.add_parser("heads", help="head scores on synthetic sequences")
    hs = p.add_subparsers(dest="heads_command", metavar="SUBCOMMAND", required=True)
    s = hs.add_parser("score", help="induction / previous-token / duplicate-token / prefix-induction scores",
                      description="Scores every head on repeated random tokens and on the prefix-induction task "
                                  "of arXiv 2406.17759; writes RUN/heads/scores.json, scores.safetensors and PNGs.")
    add_model_args(s)
    add_out_arg(s)
    s.add_argument("--layers", default="all", help="layers to score: all, 3, 1,4, 10-13, -4 (default: all)")
    s.add_argument("--n-seqs", type=int, default=32, help="repeated-token sequences (default: %(default)s)")
    s.add_argument("--half-len", type=int, default=50, help="length of each random half (default: %(default)s)")
    s.add_argument("--prefix-examples", type=int, default=100,
                   help="examples per prefix length 1..9; 0 skips prefix induction (paper: 400; default: %(default)s)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="recompute even if the run directory has the scores")
    s.set_defaults(func=_score)


def _score(args) -> int:
    from ..errors import HeadscopeError
    from ..runs import RunDir
    from .scores import SCORES, run_head_scores, top_heads
    for name in ("n_seqs", "half_len", "batch_size"):
        if getattr(args, name) < 1:
            raise HeadscopeError(f"--{name.replace('_', '-')} must be at least 1")
    if args.prefix_examples < 0:
        raise HeadscopeError("--prefix-examples must be 0 or more")
    model = load_from_args(args)
    layers = parse_layers(args.layers, model.n_layers)
    run = RunDir(args.out, model.identity())
    doc = run_head_scores(model, run, n_seqs=args.n_seqs, half_len=args.half_len,
                          prefix_examples=args.prefix_examples, batch_size=args.batch_size, seed=args.seed,
                          layers=layers, force=args.force)
    print(f"head scores for {model.name} ({model.n_layers} layers × {model.n_heads} heads) in {run.path / 'heads'}")
    for name in SCORES:
        tops = ", ".join(f"{l}.{h}={v:.2f}" for l, h, v in top_heads(doc["scores"][name]))
        print(f"  top {name.replace('_', '-')} heads: {tops}")
    if doc.get("prefix_induction"):
        longest = doc["prefix_induction"]["scores"][-1]
        tops = ", ".join(f"{l}.{h}={v:.2f}" for l, h, v in top_heads(longest))
        print(f"  top prefix-induction heads (prefix {doc['prefix_induction']['prefix_lengths'][-1]}): {tops}")
    return 0
