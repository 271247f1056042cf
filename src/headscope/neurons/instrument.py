"""The head → neuron look-ups (Neo et al.): ``headscope neurons find|mine|attribute|ablate`` and the study's
``[neurons.*]`` tables. ``--set random`` runs the random-neuron baseline into RUN/neurons/random/."""

from __future__ import annotations

from ..registry import Instrument
from ..runs import Stage
from .options import AblateOptions, AttributeOptions, FindOptions, MineOptions, Which


def _dir(which: str) -> str:
    return "neurons" if which == "top" else "neurons/random"


def stage_find(model, run, opts: FindOptions, progress: bool = True) -> dict:
    from pathlib import Path

    from ..sites import parse_layers
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
