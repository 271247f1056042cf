"""``headscope lens train|eval|show|scan|steer`` — the Attention Lens instrument's command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..cli import add_model_args, add_out_arg, load_from_args, parse_layers
from ..errors import HeadscopeError


def register(subparsers) -> None:
    p = subparsers.add_parser("lens", help="Attention Lens: train, evaluate and apply a lens for every head",
                              description="Read each attention head's output as tokens through a learned lens "
                                          "(arXiv 2310.16270), judged against the unembedding and a null lens.")
    sub = p.add_subparsers(dest="lens_command", metavar="ACTION")

    t = sub.add_parser("train", help="train lenses (closed-form start + KL refinement); resumable; torchrun-ready")
    add_model_args(t)
    add_out_arg(t)
    t.add_argument("--layers", default="all", help="'all', '18', '1,4', '10-13', '-4' (default: %(default)s)")
    t.add_argument("--heads", default="all", help="head indices for every layer ('all', '0,3') or sites '20.3,21.*'")
    t.add_argument("--kind", default="affine", choices=("affine", "lowrank", "full"))
    t.add_argument("--norm", action="store_true", help="apply the model's final norm before W_U (default: no norm)")
    t.add_argument("--rank", type=int, default=64, help="rank for --kind lowrank")
    t.add_argument("--no-vocab-bias", action="store_true", help="affine/lowrank without the vocabulary bias c")
    t.add_argument("--shared", action="store_true", help="one lens per layer shared by all its heads")
    t.add_argument("--tokens", type=int, default=None, help="tokens of KL refinement after the closed-form start (default 4096; 0: closed form only)")
    t.add_argument("--init", default="lstsq", choices=("lstsq", "base", "identity"))
    t.add_argument("--init-tokens", type=int, default=None, help="tokens for the closed-form statistics (default 8192)")
    t.add_argument("--objective", default="fkl", choices=("fkl", "rkl", "ce", "fkl_shortlist"))
    t.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--warmup", type=int, default=None)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--clip", type=float, default=1.0)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--corpus", default="default")
    t.add_argument("--chunk-tokens", type=int, default=256)
    t.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    t.add_argument("--checkpoint-every", type=int, default=50)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="held-out KL vs unembedding and null lens, information gain, transfer")
    add_model_args(e)
    add_out_arg(e)
    e.add_argument("--tokens", type=int, default=4096, help="held-out tokens (default: %(default)s)")
    e.add_argument("--transfer-tokens", type=int, default=1024, help="tokens for the cross-head transfer matrix (0: skip)")
    e.add_argument("--transfer-model", default=None, help="another checkpoint of the same architecture to apply the lenses to")
    e.set_defaults(func=_eval)

    s = sub.add_parser("show", help="per position, the top-k tokens of each head's lens next to the unembedding's")
    add_model_args(s)
    add_out_arg(s)
    s.add_argument("prompt")
    s.add_argument("--heads", default=None, help="sites '20.3,21.*' (default: every trained head)")
    s.add_argument("-k", type=int, default=5)
    s.add_argument("--by", default="prob", choices=("prob", "lift"), help="rank by lens probability or by lift over the null")
    s.add_argument("--show-uninformative", action="store_true", help="also print heads whose gain is not above zero")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_show)

    c = sub.add_parser("scan", help="how often each head's lens puts listed tokens in its top-k (+ prompt-set classifier)")
    add_model_args(c)
    add_out_arg(c)
    c.add_argument("--token-list", required=True, help="file with one word per line")
    c.add_argument("--prompts", required=True, help="file with one prompt per line")
    c.add_argument("--contrast", default=None, help="second prompt file: train a classifier separating the two sets")
    c.add_argument("-k", type=int, default=10)
    c.add_argument("--multi-token", default="first", choices=("first", "skip"),
                   help="words that are not one token: use their first token, or skip them")
    c.set_defaults(func=_scan)

    st = sub.add_parser("steer", help="add a token direction to a head, or scale/ablate heads; generations before/after")
    add_model_args(st)
    st.add_argument("--out", default=None, help="run directory with lenses (needed for --from-lens)")
    st.add_argument("prompt")
    st.add_argument("--add", action="append", default=[], metavar="L.H:TOKEN[:ALPHA]",
                    help="add TOKEN's direction (×ALPHA × the head's mean output norm, default 4) to head L.H")
    st.add_argument("--scale", action="append", default=[], metavar="L.H:ALPHA", help="multiply head L.H's output")
    st.add_argument("--ablate", action="append", default=[], metavar="L.H", help="zero head L.H")
    st.add_argument("--from-lens", action="store_true", help="use the lens' direction for the token instead of W_U's row")
    st.add_argument("--new-tokens", type=int, default=20)
    st.set_defaults(func=_steer)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])


def _lens_config(args):
    from .lenses import LensConfig
    return LensConfig(kind=args.kind, norm=args.norm, rank=args.rank, vocab_bias=not args.no_vocab_bias, shared=args.shared)


def _train_config(args):
    from .train import TrainConfig
    cfg = TrainConfig()
    for name in ("tokens", "init", "init_tokens", "objective", "optimizer", "lr", "warmup", "weight_decay", "clip",
                 "batch_size", "seq_len", "corpus", "chunk_tokens", "compute_dtype", "checkpoint_every", "seed"):
        v = getattr(args, name)
        if v is not None:
            setattr(cfg, name, v)
    return cfg


def _sites(args, model):
    from .lenses import parse_sites
    if "." in (args.heads or ""):
        return parse_sites(args.heads, model)
    return parse_sites(args.heads, model, layers=parse_layers(args.layers, model.n_layers))


def _train(args) -> int:
    from ..distributed import Distributed
    from ..models.load import load_model
    from ..runs import RunDir
    from .train import run_train
    dist = Distributed()
    device = dist.device(args.device)
    dist.init(device)
    try:
        lens, cfg = _lens_config(args).check(), _train_config(args).check()
        model = load_model(args.model, device=device, dtype=args.dtype)
        sites = _sites(args, model)
        run = RunDir(args.out, model.identity()) if dist.primary else None
        dist.barrier()
        if run is None:
            run = RunDir(args.out, model.identity())
        s = run_train(model, run, sites, lens, cfg, fresh=args.fresh, dist=dist)
        if dist.primary:
            last = s["history"][-1]["loss_bits"] if s.get("history") else None
            print(f"trained {len(sites)} lens(es) ({lens.kind}{', norm' if lens.norm else ''}) on "
                  f"{s['tokens_seen']} tokens" + (f"; final training loss {last:.3f} bits/token" if last is not None else "")
                  + f" → {Path(args.out) / 'lens'}")
    finally:
        dist.destroy()
    return 0


def _eval(args) -> int:
    from ..models.load import load_model
    from ..runs import RunDir
    from .evaluate import run_checkpoint_transfer, run_eval
    model = load_from_args(args)
    run = RunDir(args.out, model.identity())
    out = run_eval(model, run, tokens=args.tokens, transfer_tokens=args.transfer_tokens)
    ph = out["per_head"]
    print(f"held-out tokens: {out['tokens']}; null lens KL {out['kl_null']:.3f} bits/token")
    print(f"{'head':>7} {'lens':>7} {'unembed':>8} {'no-norm':>8} {'gain':>7} {'±se':>6} {'top1':>5}")
    for name, v in sorted(ph.items(), key=lambda kv: -kv[1]["gain"]):
        se = v["gain_se"] if v["gain_se"] is not None else float("nan")
        flag = "" if v["informative"] else "  (says nothing beyond base rates)" if v["gain"] <= 0 else "  (not significant)"
        print(f"{name:>7} {v['kl_lens']:7.3f} {v['kl_unembed']:8.3f} {v['kl_unembed_nonorm']:8.3f} "
              f"{v['gain']:+7.3f} {se:6.3f} {v['top1']:5.2f}{flag}")
    print(f"{out['n_positive_gain']}/{out['n_heads']} heads have a gain above zero "
          f"({out['n_informative']} by more than 2 standard errors); median gain {out['median_gain']:+.3f} bits/token")
    if args.transfer_model:
        other = load_model(args.transfer_model, device=args.device, dtype=args.dtype)
        t = run_checkpoint_transfer(other, run, tokens=args.tokens)
        print(f"on {other.name}: {t['n_positive_gain']}/{len(t['per_head'])} transferred lenses have a gain above zero")
    print(f"→ {Path(args.out) / 'lens' / 'eval.json'}")
    return 0


def _bank(args, model):
    from .lenses import load_bank
    from .train import load_null
    if not args.out:
        raise HeadscopeError("give the run directory that holds the lenses with --out")
    bank, _ = load_bank(model, Path(args.out) / "lens" if (Path(args.out) / "lens").is_dir() else Path(args.out))
    if not (_lens_dir(args) / "null.safetensors").is_file():
        raise HeadscopeError(f"missing {_lens_dir(args) / 'null.safetensors'}: rerun `headscope lens train`")
    return bank, load_null(_lens_dir(args))


def _lens_dir(args) -> Path:
    p = Path(args.out)
    return p / "lens" if (p / "lens").is_dir() else p


def _show(args) -> int:
    from .apply import format_show, load_gains, show
    from .lenses import parse_sites
    model = load_from_args(args)
    _check_k(args.k, model)
    bank, null = _bank(args, model)
    sites = None
    if args.heads:  # 'L.*' means the trained heads of layer L; an explicit 'L.H' must have a lens
        sites = []
        for part in args.heads.split(","):
            got = parse_sites(part, model)
            sites += [s for s in got if s in bank.sites] if part.strip().endswith("*") else got
        if not sites:
            raise HeadscopeError(f"no trained lens matches --heads {args.heads}")
    res = show(model, bank, args.prompt, sites, k=args.k, gains=load_gains(_lens_dir(args)), null=null, by=args.by)
    print(json.dumps(res, indent=1) if args.json else format_show(res, args.show_uninformative))
    return 0


def _check_k(k: int, model) -> None:
    if not 1 <= k <= model.d_vocab:
        raise HeadscopeError(f"-k must be between 1 and {model.d_vocab} (the vocabulary), got {k}")


def _read_lines(path: str, what: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise HeadscopeError(f"{what} file not found: {path}")
    lines = [l.rstrip("\n") for l in p.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()]
    if not lines:
        raise HeadscopeError(f"{what} file {path} is empty")
    return lines


def _scan(args) -> int:
    from ..runs import write_json
    from .apply import load_gains, scan
    model = load_from_args(args)
    _check_k(args.k, model)
    words = _read_lines(args.token_list, "token list")
    prompts = _read_lines(args.prompts, "prompts")
    contrast = _read_lines(args.contrast, "contrast prompts") if args.contrast else None
    bank, _ = _bank(args, model)
    res = scan(model, bank, words, prompts, k=args.k, multi=args.multi_token, contrast=contrast,
               gains=load_gains(_lens_dir(args)))
    write_json(_lens_dir(args) / "scan.json", res)
    rep = res["token_report"]
    if rep["multi_token"]:
        print(f"not single tokens: {', '.join(rep['multi_token'])} → "
              + ("first token used" if args.multi_token == "first" else "skipped"), file=sys.stderr)
    top = sorted(res["hit_rate"].items(), key=lambda kv: -kv[1])[:10]
    uninf = set(res.get("uninformative_heads", []))
    print(f"{len(res['token_ids'])} tokens, {res['n_prompts']} prompts, top-{args.k}; heads most often reading them:")
    for name, r in top:
        print(f"  {name:>7} {r:6.3f}" + ("  (lens gain ≤ 0: not meaningful)" if name in uninf else ""))
    if "classifier" in res:
        c = res["classifier"]
        print(f"classifier: held-out accuracy {c['heldout_accuracy']:.2f} (chance {c['chance']:.2f}, "
              f"{c['n_test']} held out); strongest: " + ", ".join(f["feature"] for f in c["top_features"][:5]))
    print(f"→ {_lens_dir(args) / 'scan.json'}")
    return 0


def _site(text: str) -> tuple[int, int]:
    try:
        l, h = text.split(".")
        return int(l), int(h)
    except ValueError:
        raise HeadscopeError(f"cannot parse head '{text}' (use LAYER.HEAD, e.g. 20.3)") from None


def _steer(args) -> int:
    from .apply import Steer, steer
    if args.new_tokens < 1:
        raise HeadscopeError(f"--new-tokens must be at least 1, got {args.new_tokens}")
    model = load_from_args(args)
    edits = []
    for a in args.add:
        parts = a.split(":")
        if len(parts) < 2:
            raise HeadscopeError(f"cannot parse --add '{a}' (use L.H:TOKEN[:ALPHA])")
        alpha = 4.0
        if len(parts) >= 3:
            try:
                alpha = float(parts[-1])
                parts = parts[:-1]
            except ValueError:
                pass
        l, h = _site(parts[0])
        edits.append(Steer(l, h, "add", ":".join(parts[1:]), alpha, args.from_lens))
    for a in args.scale:
        try:
            site, alpha = a.split(":")
            edits.append(Steer(*_site(site), "scale", None, float(alpha)))
        except ValueError:
            raise HeadscopeError(f"cannot parse --scale '{a}' (use L.H:ALPHA)") from None
    for a in args.ablate:
        edits.append(Steer(*_site(a), "scale", None, 0.0))
    bank = _bank(args, model)[0] if args.from_lens else None
    res = steer(model, args.prompt, edits, n_tokens=args.new_tokens, bank=bank)
    print(f"prompt: {res['prompt']!r}")
    for e in res["edits"]:
        print(f"edit:   {e}")
    print(f"before: {res['before']!r}")
    print(f"after:  {res['after']!r}")
    return 0
