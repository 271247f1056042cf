"""The attention-SAE instrument: ``headscope sae train|eval|analysis|dashboards|ioi|cache|sweep|dfa`` and the
study's ``[sae.*]`` tables (``[sae] name = …`` is shared by all of them)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Literal, Optional

from simple_parsing import field

from ..options import check, check_name, options_dict
from ..registry import Instrument
from ..runs import Command, Stage
from .config import TrainConfig


TrainOptions = TrainConfig
"""``sae train``'s options are the trainer's configuration (sae/config.py)."""


@dataclass(frozen=True)
class EvalOptions:
    """L0, FVE, KL/CE recovered against zero- and mean-ablation with bootstrap CIs (clustered by
    document), feature density, on held-out sequences spread over the documents."""

    name: str
    """the SAE's name in the run directory"""
    n_tokens: int = field(default=8192, alias=["--tokens"])
    """held-out tokens (n_tokens // seq_len sequences, spread over the held-out split)"""
    batch_size: int = 4
    """sequences per forward pass"""
    corpus: Optional[str] = None
    """corpus (default: the SAE's)"""
    mean_tokens: int = 16384
    """train tokens (spread over the split) for the mean-ablation baseline"""
    n_boot: int = 2000
    """bootstrap resamples for the confidence intervals"""
    min_effect: float = 0.05
    """a recovered score is meaningful only if its ablation effect's lower 95 % bound is at least this (nats/token)"""
    seed: int = 0
    """bootstrap seed"""

    def __post_init__(self):
        check_name(self.name, "--name")
        check(self.n_tokens >= 1 and self.batch_size >= 1, "--n-tokens (--tokens) and --batch-size must be at least 1")
        check(self.mean_tokens >= 1 and self.n_boot >= 1, "--mean-tokens and --n-boot must be at least 1")
        check(self.min_effect >= 0, f"--min-effect must be 0 or more, got {self.min_effect}")


def eval_outputs(name: str) -> list[str]:
    """Run-dir-relative files the ``sae.eval`` stage writes (eval.json last)."""
    return [f"sae/{name}/{f}" for f in ("sparsity.safetensors", "feature_counts.safetensors",
                                        "per_sequence.safetensors", "eval_density.png", "eval.json")]


@dataclass(frozen=True)
class AnalysisOptions:
    """Weight attribution of every feature to heads; per-head top features; polysemanticity tested
    against an untrained-SAE null and a head-permuted null (BH over heads)."""

    name: str
    """the SAE's name in the run directory"""
    top_n: int = 10
    """top features per head"""
    top_tokens: int = 10
    """output tokens per feature compared between features"""
    pair_alpha: float = 0.01
    """two features are related when their cosine or token overlap is in the top pair_alpha/2 of null pairs"""
    q: float = 0.05
    """Benjamini-Hochberg false-discovery rate over heads"""
    n_null: int = 256
    """draws of each null"""
    seed: int = 0
    """seed of the nulls"""

    def __post_init__(self):
        check_name(self.name, "--name")
        check(self.top_n >= 2 and self.top_tokens >= 1, "--top-n must be at least 2 and --top-tokens at least 1")
        check(self.n_null >= 20, f"--n-null must be at least 20, got {self.n_null}")
        check(0 < self.pair_alpha < 1 and 0 < self.q < 1, "--pair-alpha and --q must lie in (0, 1)")


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
        check_name(self.name, "--name")
        check(self.n_tokens >= 1 and self.n_examples >= 1, "--n-tokens (--tokens) and --n-examples must be at least 1")


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
        check_name(self.name, "--name")
        check(self.max_features is None or self.max_features >= 1, "--max-features must be at least 1")
        check(self.n_prompts >= 1, "--n-prompts (--prompts) must be at least 1")


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

    def __post_init__(self):
        from pathlib import Path
        check(not Path(self.dir).exists() or Path(self.dir).is_dir(), f"--dir {self.dir} is a file, not a directory")
        check(self.shard_tokens >= 1 and (self.tokens is None or self.tokens >= 1),
              "--tokens and --shard-tokens must be at least 1")


@dataclass(frozen=True)
class SweepOptions:
    """Trains SAEs of several architectures / sparsities from ONE activation cache and plots L0 against
    CE loss recovered (vs zero- and mean-ablation), one curve per architecture."""

    layer: int
    """layer whose z is encoded"""
    values: list[float] = field(default_factory=list)
    """values of --arch's sparsity knob: k (topk, batchtopk, matryoshka_batchtopk), L0 coefficient
    (jumprelu) or L1 coefficient (standard)"""
    grid: Optional[str] = None
    """several architectures instead of --arch/--values: 'topk:16,32 batchtopk:16,32 jumprelu:0.3,1'"""
    eval_tokens: int = 4096
    """held-out tokens per evaluation"""
    architecture: Literal["standard", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk"] = field(
        default="topk", alias=["--arch"])
    """SAE architecture (with --values)"""
    lr: float = 1e-3
    """Adam learning rate"""
    seq_len: int = 128
    """tokens per sequence"""
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
        check((len(self.values) >= 1) != bool(self.grid), "give either --values (with --arch) or --grid")
        if self.grid:
            from .sweep import parse_grid
            parse_grid(self.grid)


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
        check_name(self.name, "--name")
        check(self.feature >= 0, f"--feature {self.feature}: feature indices start at 0")
        check(self.top >= 1, f"--top must be at least 1, got {self.top}")


@dataclass(frozen=True)
class ImportOptions:
    """Imports a pretrained attention SAE on z into the run directory: a SAELens folder (standard, gated,
    topk, jumprelu, batchtopk, matryoshka_batchtopk; whole-layer or one head via hook_head_index) or a
    Gemma Scope params.npz. It is checked against the model, then written as RUN/sae/<name>/ so that
    sae eval / analysis / dashboards / ioi / dfa read it like a trained one."""

    path: str
    """SAELens SAE folder (cfg.json + sae_weights.safetensors) or a Gemma Scope params.npz"""
    name: str
    """name of the SAE in the run directory"""
    layer: Optional[int] = None
    """layer (needed for a params.npz whose path has no layer_<L> part)"""

    def __post_init__(self):
        check_name(self.name, "--name")
        check(self.layer is None or self.layer >= 0, f"--layer {self.layer} must be 0 or more")


def _sae_files(name: str) -> list[str]:
    return [f"sae/{name}/cfg.json", f"sae/{name}/sae_weights.safetensors"]


def stage_train(model, run, opts: TrainOptions, progress: bool = True) -> dict:
    from ..distributed import Distributed
    from .train import run_train
    dist = Distributed()
    if dist.enabled:
        model.hf.to(dist.device(str(model.device)))
    res = run_train(model, run, opts.layer, name=opts.sae_name, dist=dist, progress=progress,
                    **{k: v for k, v in options_dict(opts).items() if k not in ("layer", "name")})
    return {k: res[k] for k in ("name", "layer", "n_steps", "tokens", "tokens_per_s", "final") if k in res}


def stage_import(model, run, opts: ImportOptions, progress: bool = True) -> dict:
    from .io import import_sae
    sae = import_sae(opts.path, run / f"sae/{opts.name}", model, layer=opts.layer)
    c = sae.cfg
    return {"name": opts.name, "layer": c.layer, "architecture": c.architecture, "d_sae": c.d_sae,
            "head_index": c.head_index}


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
        Stage("sae.import", ImportOptions, "headscope.sae.instrument:stage_import",
              writes=lambda o: _sae_files(o.name),
              doc="a pretrained SAELens / Gemma Scope attention SAE, checked against the model",
              report="headscope.sae.instrument:report_json"),
        Stage("sae.eval", EvalOptions, "headscope.sae.evaluate:run_eval",
              reads=lambda o: _sae_files(o.name), writes=lambda o: eval_outputs(o.name),
              doc="SAE metrics: L0, explained variance, KL/CE recovered with bootstrap CIs, density",
              report="headscope.sae.instrument:report_json"),
        Stage("sae.analysis", AnalysisOptions, "headscope.sae.analysis:run_analysis",
              reads=lambda o: _sae_files(o.name),
              writes=lambda o: [f"sae/{o.name}/attribution.safetensors", f"sae/{o.name}/heads.json"],
              doc="head attribution of the features; polysemanticity of each head against two nulls",
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
                doc="train SAEs of several architectures from one cache; plot the L0 vs CE-recovered frontier",
                new_run=True),
        Command("sae.dfa", DfaOptions, "headscope.sae.instrument:cmd_dfa",
                doc="direct feature attribution of one feature on a prompt (and recursive DFA)"),
    ),
    atlas_data="headscope.sae.atlas_data:atlas_data",
)
