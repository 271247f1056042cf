"""The attention-SAE instrument: ``headscope sae train|eval|analysis|dashboards|ioi|cache|sweep|dfa`` and the
study's ``[sae.*]`` tables (``[sae] name = …`` is shared by all of them)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Literal, Optional

from simple_parsing import field

from ..options import check, options_dict
from ..registry import Instrument
from ..runs import Command, Stage


@dataclass(frozen=True)
class TrainOptions:
    """Trains an SAE on z (the concatenated head outputs before W_O) of one layer; resumes; torchrun for
    several processes. Writes RUN/sae/<name>/ in SAELens' format plus train.json."""

    layer: int
    """layer whose z is encoded"""
    name: Optional[str] = None
    """SAE name in the run directory (default L<layer>)"""
    architecture: Literal["standard", "topk"] = field(default="topk", alias=["--arch"])
    """standard: ReLU + L1 (the paper); topk: TopK with the AuxK dead-feature loss"""
    expansion: int = 4
    """d_sae = expansion · H·Dh"""
    d_sae: Optional[int] = None
    """number of features (overrides --expansion)"""
    k: int = 32
    """TopK: active features per token"""
    l1_coeff: float = field(default=5.0, alias=["--l1"])
    """standard: L1 coefficient on the normalised input"""
    lr: float = 1e-3
    """Adam learning rate"""
    batch_size: int = 1024
    """token rows per step and process"""
    n_tokens: int = field(default=2_000_000, alias=["--tokens"])
    """training tokens"""
    warmup_steps: int = 100
    """linear lr warm-up steps"""
    resample_every: int = 0
    """standard: resample dead features every N steps (0: never)"""
    init_b_dec: Literal["mean", "zero"] = "mean"
    """b_dec starts at the mean input or at zero"""
    seed: int = 0
    """seed"""
    corpus: str = "default"
    """corpus spec (see headscope.data)"""
    seq_len: int = 128
    """tokens per sequence"""
    buffer_tokens: int = 65536
    """tokens in one shuffling block: bounds memory"""
    cache: Optional[str] = None
    """train from an activation cache written by `headscope sae cache`"""
    checkpoint_every: int = 200
    """steps between checkpoints"""

    def __post_init__(self):
        check(self.layer >= 0, f"--layer {self.layer} must be 0 or more")
        for n in ("expansion", "k", "batch_size", "n_tokens", "seq_len", "buffer_tokens", "checkpoint_every"):
            check(getattr(self, n) >= 1, f"--{n.replace('_', '-')} must be at least 1")
        check(self.d_sae is None or self.d_sae >= 1, "--d-sae must be at least 1")

    @property
    def sae_name(self) -> str:
        return self.name or f"L{self.layer}"

    def config_kwargs(self) -> dict:
        d = options_dict(self)
        d.pop("name")
        return d


@dataclass(frozen=True)
class EvalOptions:
    """L0, FVE, CE/KL recovered against zero- and mean-ablation, feature density, on held-out tokens."""

    name: str
    """the SAE's name in the run directory"""
    n_tokens: int = field(default=8192, alias=["--tokens"])
    """held-out tokens"""
    batch_size: int = 4
    """sequences per forward pass"""
    corpus: Optional[str] = None
    """corpus (default: the SAE's)"""

    def __post_init__(self):
        check(self.n_tokens >= 1 and self.batch_size >= 1, "--tokens and --batch-size must be at least 1")


@dataclass(frozen=True)
class AnalysisOptions:
    """Weight attribution of every feature to heads; per-head top features; polysemanticity."""

    name: str
    """the SAE's name in the run directory"""
    top_n: int = 10
    """top features per head"""
    cos_threshold: float = 0.3
    """decoder-block cosine above which two features are related"""
    token_jaccard: float = 0.2
    """top-token overlap above which two features are related"""


@dataclass(frozen=True)
class DashboardOptions:
    """Feature pages: max-activating examples, DFA, logits, density."""

    name: str
    """the SAE's name in the run directory"""
    n_tokens: int = field(default=16384, alias=["--tokens"])
    """held-out tokens scanned"""
    batch_size: int = 8
    """sequences per forward pass"""
    n_examples: int = 10
    """max-activating examples per feature"""
    corpus: Optional[str] = None
    """corpus (default: the SAE's)"""

    def __post_init__(self):
        check(self.n_tokens >= 1 and self.n_examples >= 1, "--tokens and --n-examples must be at least 1")


@dataclass(frozen=True)
class IoiOptions:
    """IOI worked example: features at S2 that matter for the logit difference."""

    name: str
    """the SAE's name in the run directory"""
    n_prompts: int = field(default=100, alias=["--prompts"])
    """IOI prompts"""
    max_features: Optional[int] = None
    """ablate at most this many live features"""
    seed: int = 0
    """prompt seed"""

    def __post_init__(self):
        check(self.n_prompts >= 1, "--prompts must be at least 1")


@dataclass(frozen=True)
class CacheOptions:
    """Runs the model once and caches z of several layers to disk shards (the fast path for sweeps)."""

    layers: str
    """e.g. '3', '1,4', '2-5'"""
    dir: str
    """cache folder"""
    tokens: Optional[int] = None
    """tokens to cache (default: the whole train split)"""
    shard_tokens: int = 65536
    """tokens per shard"""
    corpus: str = "default"
    """corpus spec"""
    seq_len: int = 128
    """tokens per sequence"""


@dataclass(frozen=True)
class SweepOptions:
    """Trains several SAEs (k or L1 values) and plots the L0 vs CE-recovered frontier."""

    layer: int
    """layer whose z is encoded"""
    values: list[float]
    """k values (topk) or L1 coefficients (standard)"""
    eval_tokens: int = 4096
    """held-out tokens per evaluation"""
    architecture: Literal["standard", "topk"] = field(default="topk", alias=["--arch"])
    """SAE architecture"""
    n_tokens: int = field(default=2_000_000, alias=["--tokens"])
    """training tokens per SAE"""
    batch_size: int = 1024
    """token rows per step"""
    expansion: int = 4
    """d_sae = expansion · H·Dh"""
    corpus: str = "default"
    """corpus spec"""
    cache: Optional[str] = None
    """activation cache to train from"""

    def __post_init__(self):
        check(len(self.values) >= 1, "--values needs at least one value")


@dataclass(frozen=True)
class DfaOptions:
    """Direct feature attribution of one feature on a prompt (and one recursive step)."""

    name: str
    """the SAE's name in the run directory"""
    feature: int
    """feature index"""
    prompt: str
    """the prompt"""
    dest: int = -1
    """destination position (negative: from the end)"""
    recursive: bool = False
    """also one step upstream through the value path"""
    top: int = 10
    """components shown by --recursive"""

    def __post_init__(self):
        check(self.feature >= 0, f"--feature {self.feature}: feature indices start at 0")


def _sae_files(name: str) -> list[str]:
    return [f"sae/{name}/cfg.json", f"sae/{name}/sae_weights.safetensors"]


def stage_train(model, run, opts: TrainOptions, progress: bool = True) -> dict:
    from ..distributed import Distributed
    from .train import run_train
    dist = Distributed()
    if dist.enabled:
        model.hf.to(dist.device(str(model.device)))
    res = run_train(model, run, opts.layer, name=opts.sae_name, dist=dist, progress=progress,
                    **{k: v for k, v in opts.config_kwargs().items() if k != "layer"})
    return {k: res[k] for k in ("name", "layer", "n_steps", "tokens", "tokens_per_s", "final") if k in res}


def stage_eval(model, run, opts: EvalOptions, progress: bool = True) -> dict:
    from .evaluate import run_eval
    res = run_eval(model, run, opts.name, n_tokens=opts.n_tokens, batch_size=opts.batch_size, corpus=opts.corpus,
                   progress=progress, force=True)
    return {k: v for k, v in res.items() if k != "density_hist"}


def stage_analysis(model, run, opts: AnalysisOptions, progress: bool = True) -> dict:
    from .analysis import run_analysis
    res = run_analysis(model, run, opts.name, top_n=opts.top_n, cos_threshold=opts.cos_threshold,
                       token_jaccard=opts.token_jaccard)
    return {"heads": len(res["heads"]), "polysemantic_frac": res.get("polysemantic_frac")}


def stage_dashboards(model, run, opts: DashboardOptions, progress: bool = True) -> dict:
    from .dashboards import run_dashboards
    idx = run_dashboards(model, run, opts.name, n_tokens=opts.n_tokens, batch_size=opts.batch_size,
                         n_examples=opts.n_examples, corpus=opts.corpus, progress=progress)
    return {"alive": idx.get("alive")}


def stage_ioi(model, run, opts: IoiOptions, progress: bool = True) -> dict:
    from .ioi import run_ioi
    res = run_ioi(model, run, opts.name, n_prompts=opts.n_prompts, seed=opts.seed, max_features=opts.max_features,
                  progress=progress)
    return {k: v for k, v in res.items() if k != "features"}


def report_json(summary: dict, opts, run) -> None:
    print(json.dumps(summary, indent=1, default=str))


def _legacy(model, run, opts, handler: str) -> int:
    from . import cli
    return getattr(cli, handler)(model, argparse.Namespace(out=str(run.path), **options_dict(opts)))


def cmd_cache(model, run, opts: CacheOptions) -> int:
    return _legacy(model, run, opts, "cmd_cache")


def cmd_sweep(model, run, opts: SweepOptions) -> int:
    return _legacy(model, run, opts, "cmd_sweep")


def cmd_dfa(model, run, opts: DfaOptions) -> int:
    return _legacy(model, run, opts, "cmd_dfa")


INSTRUMENT = Instrument(
    name="sae",
    help="sparse autoencoders on attention outputs (z): train, evaluate, attribute",
    stages=(
        Stage("sae.train", TrainOptions, "headscope.sae.instrument:stage_train",
              writes=lambda o: _sae_files(o.sae_name) + [f"sae/{o.sae_name}/train.json"],
              doc="one attention-output SAE", report="headscope.sae.instrument:report_json"),
        Stage("sae.eval", EvalOptions, "headscope.sae.instrument:stage_eval",
              reads=lambda o: _sae_files(o.name), writes=lambda o: [f"sae/{o.name}/eval.json"],
              doc="SAE metrics: L0, explained variance, CE/KL recovered, density",
              report="headscope.sae.instrument:report_json"),
        Stage("sae.analysis", AnalysisOptions, "headscope.sae.instrument:stage_analysis",
              reads=lambda o: _sae_files(o.name), writes=lambda o: [f"sae/{o.name}/heads.json"],
              doc="head attribution of the features; polysemanticity of each head",
              report="headscope.sae.instrument:report_json"),
        Stage("sae.dashboards", DashboardOptions, "headscope.sae.instrument:stage_dashboards",
              reads=lambda o: _sae_files(o.name), writes=lambda o: [f"sae/{o.name}/dashboards"],
              doc="feature pages: max-activating examples, DFA, logits, density",
              report="headscope.sae.instrument:report_json"),
        Stage("sae.ioi", IoiOptions, "headscope.sae.instrument:stage_ioi",
              reads=lambda o: _sae_files(o.name), writes=lambda o: [f"sae/{o.name}/ioi.json"],
              doc="IOI worked example: logit difference when each live feature is ablated at S2",
              report="headscope.sae.instrument:report_json"),
    ),
    commands=(
        Command("sae.cache", CacheOptions, "headscope.sae.instrument:cmd_cache",
                doc="run the model once and cache z of several layers to disk shards", new_run=True),
        Command("sae.sweep", SweepOptions, "headscope.sae.instrument:cmd_sweep",
                doc="train several SAEs and plot the L0 vs CE-recovered frontier", new_run=True),
        Command("sae.dfa", DfaOptions, "headscope.sae.instrument:cmd_dfa",
                doc="direct feature attribution of one feature on a prompt (and recursive DFA)"),
    ),
    atlas_data="headscope.sae.atlas_data:atlas_data",
)
