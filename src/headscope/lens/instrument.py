"""The Attention Lens instrument: ``headscope lens train|eval|show|scan|steer`` and the study's
``[lens.train]`` / ``[lens.eval]`` tables. Options are declared here once (CLI flags, TOML keys, checks)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal, Optional

from simple_parsing import field
from simple_parsing.helpers import flag

from ..options import check, options_dict
from ..registry import Instrument
from ..runs import Command, Stage


@dataclass(frozen=True)
class TrainOptions:
    """Trains a lens for every head asked for: a closed-form start (least squares on the model's own logits,
    per-head scale) refined by KL; resumable; torchrun-ready."""

    layers: str = "all"
    """'all', '18', '1,4', '10-13', '-4'"""
    heads: str = "all"
    """head indices for every layer ('all', '0,3') or sites '20.3,21.*'"""
    kind: Literal["affine", "lowrank", "full"] = "affine"
    """lens parameterization"""
    norm: bool = False
    """apply the model's final norm before W_U"""
    rank: int = 64
    """rank for --kind lowrank"""
    vocab_bias: bool = flag(default=True, negative_prefix="--no-")
    """learn the vocabulary bias c (affine/lowrank)"""
    shared: bool = False
    """one lens per layer shared by all its heads"""
    tokens: int = 4096
    """tokens of KL refinement after the closed-form start (0: closed form only)"""
    init: Literal["lstsq", "base", "identity"] = "lstsq"
    """the start: closed-form least squares, the unembedding, or identity"""
    init_tokens: int = 8192
    """tokens for the closed-form statistics"""
    objective: Literal["fkl", "rkl", "ce", "fkl_shortlist"] = "fkl"
    """refinement objective"""
    optimizer: Literal["adam", "sgd"] = "adam"
    """refinement optimizer"""
    lr: float = 3e-4
    """learning rate"""
    warmup: int = 1
    """warm-up steps"""
    weight_decay: float = 0.0
    """weight decay"""
    clip: float = 1.0
    """gradient-norm clip"""
    batch_size: int = 8
    """sequences per step"""
    seq_len: int = 128
    """tokens per sequence"""
    corpus: str = "default"
    """'default', a text file, a folder, a JSONL file"""
    chunk_tokens: int = 256
    """positions per vocabulary-logit chunk (memory bound)"""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the lens logits"""
    checkpoint_every: int = 50
    """steps between checkpoints"""
    seed: int = 0
    """data and initialisation seed"""

    def __post_init__(self):
        for name in ("init_tokens", "batch_size", "seq_len", "chunk_tokens", "checkpoint_every", "rank"):
            check(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
        check(self.tokens >= 0, "--tokens must be 0 or more")
        check(self.lr > 0, "--lr must be positive")

    def configs(self):
        """The (LensConfig, TrainConfig) pair the trainer takes."""
        from .lenses import LensConfig
        from .train import TrainConfig
        d = options_dict(self)
        lens = LensConfig(**{k: d[k] for k in ("kind", "norm", "rank", "vocab_bias", "shared")})
        train = TrainConfig(**{k: v for k, v in d.items()
                               if k in TrainConfig.__dataclass_fields__})
        return lens.check(), train.check()


@dataclass(frozen=True)
class EvalOptions:
    """Held-out KL of every lens against the unembedding baseline and the null lens; information gain."""

    tokens: int = 4096
    """held-out tokens"""
    transfer_tokens: int = 1024
    """tokens for the cross-head transfer matrix (0: skip)"""
    batch_size: int = 8
    """sequences per forward pass"""

    def __post_init__(self):
        check(self.tokens >= 1, "--tokens must be at least 1")
        check(self.transfer_tokens >= 0, "--transfer-tokens must be 0 or more")
        check(self.batch_size >= 1, "--batch-size must be at least 1")


@dataclass(frozen=True)
class ShowOptions:
    """Per position, the top-k tokens of each head's lens next to the unembedding's."""

    prompt: str = field(positional=True)
    """the prompt"""
    heads: Optional[str] = None
    """sites '20.3,21.*' (default: every trained head)"""
    k: int = field(default=5, alias=["-k"])
    """tokens per position"""
    by: Literal["prob", "lift"] = "prob"
    """rank by lens probability or by lift over the null"""
    show_uninformative: bool = False
    """also print heads whose gain is not significant"""
    json: bool = False
    """print JSON"""

    def __post_init__(self):
        check(1 <= self.k <= 1000, f"-k {self.k}: use 1..1000")


@dataclass(frozen=True)
class ScanOptions:
    """How often each head's lens puts listed tokens in its top-k (+ a prompt-set classifier)."""

    token_list: str
    """file with one word per line"""
    prompts: str
    """file with one prompt per line"""
    contrast: Optional[str] = None
    """second prompt file: train a classifier separating the two sets"""
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
    out = run_eval(model, run, tokens=opts.tokens, batch_size=opts.batch_size, transfer_tokens=opts.transfer_tokens)
    return {k: out.get(k) for k in ("tokens", "n_heads", "n_positive_gain", "n_informative", "median_gain")}


def report_eval(summary: dict, opts: EvalOptions, run) -> None:
    from ..runs import read_json
    out = read_json(run / "lens" / "eval.json")
    print(f"held-out tokens: {out['tokens']}; null lens KL {out['kl_null']:.3f} bits/token")
    print(f"{'head':>7} {'lens':>7} {'unembed':>8} {'gain':>7} {'±se':>6}")
    for name, v in sorted(out["per_head"].items(), key=lambda kv: -kv[1]["gain"]):
        se = v["gain_se"] if v["gain_se"] is not None else float("nan")
        flag = "" if v["informative"] else "  (not significant)"
        print(f"{name:>7} {v['kl_lens']:7.3f} {v['kl_unembed']:8.3f} {v['gain']:+7.3f} {se:6.3f}{flag}")
    print(f"{out['n_informative']}/{out['n_heads']} heads informative; median gain {out['median_gain']:+.3f} bits/token")
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
