"""The Attention Lens instrument: ``headscope lens train|eval|show|scan|steer`` and the study's
``[lens.train]`` / ``[lens.eval]`` tables. Options are declared here once (CLI flags, TOML keys, checks)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Literal, Optional

from simple_parsing import field
from simple_parsing.helpers import flag

from ..options import check, options_dict
from ..registry import Instrument
from ..runs import Command, Stage
from .lenses import LensConfig
from .options import SteerEvalOptions
from .train import TrainConfig


@dataclass
class TrainOptions(TrainConfig, LensConfig):
    """Trains a lens for every head asked for: a closed-form start (least squares on the model's own logits,
    per-head scale) refined by KL; resumable; torchrun-ready. The options are the lens parameterization
    (LensConfig) and the trainer's configuration (TrainConfig), declared once there, plus which heads."""

    layers: str = "all"
    """'all', '18', '1,4', '10-13', '-4'"""
    heads: str = "all"
    """head indices for every layer ('all', '0,3') or sites '20.3,21.*'"""

    def __post_init__(self):
        self.configs()  # the trainer's own checks, before anything runs

    def configs(self) -> tuple[LensConfig, TrainConfig]:
        """The (LensConfig, TrainConfig) pair the trainer takes, checked."""
        d = options_dict(self)
        lens = LensConfig(**{f.name: d[f.name] for f in fields(LensConfig)})
        train = TrainConfig(**{f.name: d[f.name] for f in fields(TrainConfig)})
        return lens.check(), train.check()


@dataclass(frozen=True)
class EvalOptions:
    """Held-out KL of every lens against the unembedding baseline, the null lens and a control lens;
    information gain with SEs clustered by document; informative = one-sided test, BH q = 0.05."""

    tokens: int = 8192
    """held-out tokens, sampled across the held-out documents (position 0 left out)"""
    transfer_tokens: int = 0
    """tokens for the cross-head transfer matrix (0: skip)"""
    batch_size: int = 8
    """sequences per forward pass"""
    stride: int = 1
    """evaluate every stride-th position of each window: --tokens positions from tokens·stride window
    tokens, so as many documents for the SE at 1/stride of the lenses' cost"""
    baselines: bool = flag(default=True, negative_prefix="--no-")
    """also measure the unembedding baselines W_U·N(r_h) and W_U·r_h (d·V multiply-adds per head and
    position each, ~10× a lens that reads z): --no-baselines leaves kl_unembed/improvement empty"""

    def __post_init__(self):
        check(self.tokens >= 1, "--tokens must be at least 1")
        check(self.transfer_tokens >= 0, "--transfer-tokens must be 0 or more")
        check(self.batch_size >= 1, "--batch-size must be at least 1")
        check(self.stride >= 1, "--stride must be at least 1")


@dataclass(frozen=True)
class ShowOptions:
    """Per position, the top-k tokens of each head's lens next to the unembedding's."""

    prompt: str = field(positional=True)
    """the prompt"""
    heads: Optional[str] = None
    """sites '20.3,21.*' (default: every trained head)"""
    k: int = field(default=5, alias=["-k"])
    """tokens per position"""
    by: Literal["kl", "prob", "lift"] = "kl"
    """rank by the token's term q·log(q/q_null) of KL(lens ‖ null), by lens probability, or by lift"""
    show_uninformative: bool = False
    """also print heads that are not informative (BH q = 0.05)"""
    json: bool = False
    """print JSON"""

    def __post_init__(self):
        check(1 <= self.k <= 1000, f"-k {self.k}: use 1..1000")


@dataclass(frozen=True)
class ScanOptions:
    """How often each head's lens puts listed tokens in its top-k, against a frequency-matched control list
    (BH over heads); with --contrast, a prompt-set classifier scored by held-out AUROC against baselines."""

    token_list: str
    """file with one word per line (or builtin:injection_words)"""
    prompts: str
    """file with one prompt per line; '# source: NAME' lines group prompts for cross-validation (or
    builtin:injection)"""
    contrast: Optional[str] = None
    """second prompt file (or builtin:ordinary): a classifier separating the two sets, held-out AUROC with a
    CI next to bag-of-words, unembedding and random-head baselines"""
    k: int = field(default=10, alias=["-k"])
    """top-k"""
    multi_token: Literal["first", "skip"] = "first"
    """words that are not one token: use their first token, or skip them"""

    def __post_init__(self):
        check(1 <= self.k <= 1000, f"-k {self.k}: use 1..1000")


@dataclass(frozen=True)
class SteerOptions:
    """Adds a token direction to a head, or scales/ablates heads; generations before and after."""

    prompt: str = field(positional=True)
    """the prompt"""
    add: list[str] = field(default_factory=list)
    """L.H:TOKEN[:ALPHA] …: add TOKEN's direction (×ALPHA × the head's mean output norm, default 4) to head L.H"""
    scale: list[str] = field(default_factory=list)
    """L.H:ALPHA …: multiply head L.H's output"""
    ablate: list[str] = field(default_factory=list)
    """L.H …: zero head L.H"""
    from_lens: bool = False
    """use the lens' direction for the token instead of W_U's row (needs lenses in --out)"""
    new_tokens: int = 20
    """tokens to generate"""

    def __post_init__(self):
        check(1 <= self.new_tokens <= 4096, "--new-tokens must be in 1..4096")


def stage_train(model, run, opts: TrainOptions, progress: bool = True) -> dict:
    """lens.train: train the lenses of ``opts.layers``/``opts.heads`` into RUN/lens (torchrun-aware)."""
    from ..cli import parse_layers
    from ..distributed import Distributed
    from .lenses import parse_sites
    from .train import run_train
    lens, cfg = opts.configs()
    sites = parse_sites(opts.heads, model) if "." in opts.heads else \
        parse_sites(opts.heads, model, layers=parse_layers(opts.layers, model.n_layers))
    s = run_train(model, run, sites, lens, cfg, fresh=False, progress=progress, dist=Distributed())
    return {k: s.get(k) for k in ("tokens_seen", "steps") if k in s} | {"sites": len(sites)}


def stage_eval(model, run, opts: EvalOptions, progress: bool = True) -> dict:
    """lens.eval: held-out KL and information gain of every lens in RUN/lens."""
    from .evaluate import run_eval
    out = run_eval(model, run, tokens=opts.tokens, batch_size=opts.batch_size, transfer_tokens=opts.transfer_tokens,
                   baselines=opts.baselines, stride=opts.stride)
    keys = ("tokens", "documents", "n_heads", "n_positive_gain", "n_informative", "n_informative_2se", "median_gain",
            "median_gain_se")
    return {k: out.get(k) for k in keys} | {"control_gain": [c["gain"] for c in out["control"].values()]}


def report_eval(summary: dict, opts: EvalOptions, run) -> None:
    from ..runs import read_json
    out = read_json(run / "lens" / "eval.json")
    print(f"held-out tokens: {out['tokens']} (position 0 left out) in {out['windows']} windows from {out['documents']} "
          f"documents; null lens KL {out['kl_null']:.3f} bits/token")
    print(f"{'head':>9} {'lens':>7} {'unembed':>8} {'gain':>7} {'±se':>6} {'p':>8}")

    def row(name, v, flag=""):
        se = v["gain_se"] if v["gain_se"] is not None else float("nan")
        p = v["p_value"] if v["p_value"] is not None else float("nan")
        ku = v["kl_unembed"] if v["kl_unembed"] is not None else float("nan")
        print(f"{name:>9} {v['kl_lens']:7.3f} {ku:8.3f} {v['gain']:+7.3f} {se:6.3f} {p:8.2g}{flag}")
    for name, v in sorted(out["per_head"].items(), key=lambda kv: -kv[1]["gain"]):
        row(name, v, "" if v["informative"] else "  (not informative)")
    for name, c in out["control"].items():
        row(name, c, f"  (control: scrambled output of {c['source']}; what 'no information' gives)")
    ctrl = ", ".join(f"{c['gain']:+.3f} ± {c['gain_se'] or float('nan'):.3f}" for c in out["control"].values())
    se = out.get("median_gain_se")
    print(f"{out['n_informative']}/{out['n_heads']} heads informative (one-sided test, Benjamini-Hochberg q = {out['q']}); "
          f"{out['n_informative_2se']} by the gain > 2 SE rule; {out['n_positive_gain']} with a gain above zero; "
          f"median gain {out['median_gain']:+.3f}" + (f" ± {se:.3f}" if se is not None else "") + " bits/token; "
          f"control lens {ctrl}")
    print(f"→ {run / 'lens' / 'eval.json'}")


def _legacy(model, run, opts, handler: str) -> int:
    from . import cli
    args = argparse.Namespace(out=str(run.path), **options_dict(opts))
    return getattr(cli, handler)(model, args)


def cmd_show(model, run, opts: ShowOptions) -> int:
    return _legacy(model, run, opts, "show_cmd")


def cmd_scan(model, run, opts: ScanOptions) -> int:
    return _legacy(model, run, opts, "scan_cmd")


def cmd_steer(model, run, opts: SteerOptions) -> int:
    return _legacy(model, run, opts, "steer_cmd")


def _steer_result():
    from .steer_eval import SteerEvalResult
    return SteerEvalResult


LENS_FILES = ["lens/lenses.json", "lens/lenses.safetensors", "lens/null.safetensors", "lens/train.json"]
"""The bank, its null lens and its training summary (train.json is written last)."""

INSTRUMENT = Instrument(
    name="lens",
    help="Attention Lens: train, evaluate and apply a lens for every head",
    description="Read each attention head's output as tokens through a learned lens (arXiv 2310.16270), "
                "judged against the unembedding and a null lens.",
    stages=(
        Stage("lens.train", TrainOptions, "headscope.lens.instrument:stage_train",
              writes=lambda o: LENS_FILES,
              doc="per-head lenses (closed-form start + KL refinement)"),
        Stage("lens.eval", EvalOptions, "headscope.lens.instrument:stage_eval",
              reads=lambda o: LENS_FILES, writes=lambda o: ["lens/eval.json"],
              doc="held-out KL of each lens against the unembedding baseline and the null lens",
              report="headscope.lens.instrument:report_eval"),
        Stage("lens.steer-eval", SteerEvalOptions, "headscope.lens.steer_eval:stage_steer_eval",
              reads=lambda o: LENS_FILES + ([] if o.heads else ["lens/eval.json"]),
              writes=lambda o: ["lens/steer_eval.json"],
              doc="steering through heads against a random direction and residual-stream steering",
              report="headscope.lens.steer_eval:report_steer_eval", result=_steer_result()),
    ),
    commands=(
        Command("lens.show", ShowOptions, "headscope.lens.instrument:cmd_show",
                doc="per position, the top-k tokens of each head's lens"),
        Command("lens.scan", ScanOptions, "headscope.lens.instrument:cmd_scan",
                doc="how often each head's lens puts listed tokens in its top-k"),
        Command("lens.steer", SteerOptions, "headscope.lens.instrument:cmd_steer",
                doc="add a token direction to a head, or scale/ablate heads; generations before/after", new_run=True),
    ),
    atlas_data="headscope.lens.atlas_data:atlas_data",
)
