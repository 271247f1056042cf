"""The head → neuron look-ups (Neo et al.): ``headscope neurons find|mine|attribute|ablate`` and the study's
``[neurons.*]`` tables. ``--set random`` runs the random-neuron baseline into RUN/neurons/random/."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from simple_parsing import field
from simple_parsing.helpers import flag

from ..options import check
from ..registry import Instrument
from ..runs import Stage

Which = Literal["top", "random"]


def _dir(which: str) -> str:
    return "neurons" if which == "top" else "neurons/random"


@dataclass(frozen=True)
class FindOptions:
    """Ranks MLP neurons by the congruence of their output weight with the unembedding (dot, cosine, kurtosis,
    skew); writes RUN/neurons/find.json."""

    which: Which = field(default="top", alias=["--set"])
    """neuron set: congruent neurons (top) or the random-neuron baseline"""
    layers: Optional[str] = None
    """layers to search (default: the last --last-k layers)"""
    last_k: int = 3
    """search the last K layers"""
    per_layer: int = 20
    """neurons per layer"""
    rank_by: Literal["dot", "cos", "kurtosis", "skew"] = "dot"
    """congruence statistic to rank by"""
    kind: Literal["prediction", "suppression"] = "prediction"
    """prediction (positive) or suppression (negative) neurons"""
    require_space: bool = flag(default=True, negative_prefix="--no-")
    """require the token to start with a space"""
    min_chars: int = 3
    """minimum characters of the token"""
    reject_file: Optional[str] = None
    """file of tokens to reject, one per line (replaces the built-in list)"""
    seed: int = 0
    """seed of the random set"""
    unembed: Literal["centred", "raw"] = "centred"
    """W_U centred over the vocabulary (TransformerLens' center_unembed; the softmax ignores a constant shift) or raw"""

    def __post_init__(self):
        check(self.last_k >= 1 and self.per_layer >= 1, "--last-k and --per-layer must be at least 1")
        check(self.min_chars >= 0, "--min-chars must be 0 or more")


@dataclass(frozen=True)
class MineOptions:
    """One forward pass over the corpus serves every neuron; prompts end at the activating token and are trimmed
    to the shortest suffix keeping --keep of the activation. Writes RUN/neurons/mine.json."""

    which: Which = field(default="top", alias=["--set"])
    """neuron set"""
    corpus: str = "default"
    """corpus spec (see headscope.data)"""
    seq_len: int = 128
    """tokens per sequence"""
    top_k: int = 20
    """train prompts per neuron"""
    top_k_test: int = 20
    """held-out prompts per neuron"""
    keep: float = 0.8
    """fraction of the activation trimming keeps"""
    max_prompt_tokens: int = 100
    """drop longer trimmed prompts"""
    trim_tolerance: float = 0.0
    """stop the trimming search once the kept length is within this fraction of the shortest (0: exact)"""
    max_tokens: Optional[int] = None
    """mine at most this many tokens per split"""
    batch_size: int = 16
    """sequences per forward pass"""

    def __post_init__(self):
        for n in ("seq_len", "top_k", "top_k_test", "max_prompt_tokens", "batch_size"):
            check(getattr(self, n) >= 1, f"--{n.replace('_', '-')} must be at least 1")
        check(0 < self.keep <= 1, "--keep must be in (0, 1]")
        check(0 <= self.trim_tolerance < 1, "--trim-tolerance must be in [0, 1)")
        check(self.max_tokens is None or self.max_tokens >= 1, "--max-tokens must be at least 1")


@dataclass(frozen=True)
class AttributeOptions:
    """A = <head result, folded neuron input direction> at the prompt's last token for every eligible head;
    active when A > mean + K·σ. Writes RUN/neurons/attribution.json and attribution.safetensors."""

    which: Which = field(default="top", alias=["--set"])
    """neuron set"""
    gated: Literal["full", "gate", "up"] = "full"
    """gated MLPs: first-order term(s)"""
    norm_scale: bool = flag(default=True, negative_prefix="--no-")
    """divide by the norm's σ"""
    k_sigma: float = 2.0
    """active: A > mean + K·σ"""
    low: float = 0.25
    """explain heads active on ≥ LOW of prompts"""
    high: float = 0.75
    """explain heads active on ≤ HIGH of prompts"""
    batch_size: int = 32
    """prompts per forward pass"""

    def __post_init__(self):
        check(0 <= self.low <= self.high <= 1, "need 0 <= --low <= --high <= 1")
        check(self.batch_size >= 1, "--batch-size must be at least 1")


@dataclass(frozen=True)
class AblateOptions:
    """Drop in P(token) when a head is zeroed, on prompts where it is active vs inactive: per-pair Mann–Whitney
    with BH, per-neuron effect with a bootstrap interval and a Wilcoxon test; compared with the random neurons
    when both sets are ablated."""

    which: Which = field(default="top", alias=["--set"])
    """neuron set"""
    max_pairs: Optional[int] = None
    """ablate at most this many pairs"""
    mode: Literal["z", "value"] = "z"
    """zero the head's z slice, or its KV group's values (GQA: all heads of the group)"""
    batch_size: int = 32
    """prompts per forward pass"""

    def __post_init__(self):
        check(self.max_pairs is None or self.max_pairs >= 1, "--max-pairs must be at least 1")
        check(self.batch_size >= 1, "--batch-size must be at least 1")


def stage_find(model, run, opts: FindOptions, progress: bool = True) -> dict:
    from pathlib import Path

    from ..cli import parse_layers
    from ..errors import HeadscopeError
    from .stages import run_find
    layers = parse_layers(opts.layers, model.n_layers) if opts.layers else None
    reject = None
    if opts.reject_file:
        p = Path(opts.reject_file)
        if not p.is_file():
            raise HeadscopeError(f"reject file not found: {p}")
        reject = [line.rstrip("\n") for line in p.read_text().splitlines() if line.strip()]
    return run_find(model, run, opts.which, layers=layers, last_k=opts.last_k, per_layer=opts.per_layer,
                    rank_by=opts.rank_by, kind=opts.kind, require_space=opts.require_space, min_chars=opts.min_chars,
                    reject=reject, seed=opts.seed, unembed=opts.unembed)


def stage_mine(model, run, opts: MineOptions, progress: bool = True) -> dict:
    from .stages import run_mine
    return run_mine(model, run, opts.which, corpus=opts.corpus, seq_len=opts.seq_len, top_k=opts.top_k,
                    top_k_test=opts.top_k_test, keep=opts.keep, max_prompt_tokens=opts.max_prompt_tokens,
                    trim_tolerance=opts.trim_tolerance, batch_size=opts.batch_size, max_tokens=opts.max_tokens, progress=progress)


def stage_attribute(model, run, opts: AttributeOptions, progress: bool = True) -> dict:
    from .stages import run_attribute
    return run_attribute(model, run, opts.which, gated=opts.gated, norm_scale=opts.norm_scale, k_sigma=opts.k_sigma,
                         low=opts.low, high=opts.high, batch_size=opts.batch_size, progress=progress)


def stage_ablate(model, run, opts: AblateOptions, progress: bool = True) -> dict:
    from .stages import run_ablate
    return run_ablate(model, run, opts.which, max_pairs=opts.max_pairs, mode=opts.mode, batch_size=opts.batch_size,
                      progress=progress)


def report_find(summary: dict, opts: FindOptions, run) -> None:
    from ..runs import read_json
    path = run / _dir(opts.which) / "find.json"
    found = read_json(path)["neurons"]
    print(f"{len(found)} {opts.which} neurons in {path}")
    for n in found[:10]:
        print(f"  L{n['layer']}.N{n['neuron']}  token {n['token']!r}  dot {n['dot']:.3f}  cos {n['cos']:.3f}  "
              f"kurtosis {n['kurtosis']:.1f}  skew {n['skew']:.2f}")


def report_summary(summary: dict, opts, run) -> None:
    print(", ".join(f"{k}: {v}" for k, v in summary.items() if not isinstance(v, (dict, list))))


def report_ablate(res: dict, opts, run) -> None:
    fmt = lambda x: "n/a" if x is None else f"{x:.4g}"
    e = res["effect"]
    print(f"{res['pairs']} pairs over {res['neurons']} neurons; per-neuron effect (mean drop active − inactive) "
          f"{fmt(e['mean'])} [{fmt(e['low'])}, {fmt(e['high'])}], Wilcoxon p = {fmt(res['wilcoxon']['p'])}; "
          f"{res['significant_bh']} pairs significant (Mann–Whitney, BH q < 0.05)")
    if "vs_random" in res:
        v = res["vs_random"]
        print(f"random neurons: effect {fmt(v['random']['mean'])}; congruent − random {fmt(v['difference']['diff'])} "
              f"[{fmt(v['difference']['low'])}, {fmt(v['difference']['high'])}], Mann–Whitney p = "
              f"{fmt(v['mann_whitney']['p'])}")


def load(model, run, which: Which = "top") -> dict:
    """The neuron set's artifacts that exist, as JSON documents: ``find``, ``mine``, ``attribution``,
    ``ablation`` (RUN/neurons/ for ``top``, RUN/neurons/random/ for ``random``)."""
    from ..errors import HeadscopeError
    from ..runs import read_json
    folder = run / _dir(which)
    out = {name: read_json(folder / f"{name}.json") for name in ("find", "mine", "attribution", "ablation")
           if (folder / f"{name}.json").is_file()}
    if not out:
        raise HeadscopeError(f"no {which} neurons in {run.path}: run `run.neurons.find(which='{which}')` first")
    return out


INSTRUMENT = Instrument(
    name="neurons",
    help="next-token neurons, their max-activating prompts and the heads that drive them",
    stages=(
        Stage("neurons.find", FindOptions, "headscope.neurons.instrument:stage_find",
              writes=lambda o: [f"{_dir(o.which)}/find.json"],
              doc="next-token neurons ranked by congruence", report="headscope.neurons.instrument:report_find"),
        Stage("neurons.mine", MineOptions, "headscope.neurons.instrument:stage_mine",
              reads=lambda o: [f"{_dir(o.which)}/find.json"], writes=lambda o: [f"{_dir(o.which)}/mine.json"],
              doc="max-activating prompts of each neuron", report="headscope.neurons.instrument:report_summary"),
        Stage("neurons.attribute", AttributeOptions, "headscope.neurons.instrument:stage_attribute",
              reads=lambda o: [f"{_dir(o.which)}/mine.json"],
              writes=lambda o: [f"{_dir(o.which)}/attribution.json"],
              doc="head → neuron attribution on those prompts", report="headscope.neurons.instrument:report_summary"),
        Stage("neurons.ablate", AblateOptions, "headscope.neurons.instrument:stage_ablate",
              reads=lambda o: [f"{_dir(o.which)}/attribution.json"], writes=lambda o: [f"{_dir(o.which)}/ablation.json"],
              doc="drop in P(token) when a head is ablated, active vs inactive prompts",
              report="headscope.neurons.instrument:report_ablate"),
    ),
    atlas_data="headscope.neurons.atlas_data:atlas_data",
    loaders=(("load", "headscope.neurons.instrument:load"),),
)
