"""The head → neuron look-ups (Neo et al.): ``headscope neurons find|mine|attribute|ablate`` and the study's
``[neurons.*]`` tables. ``--set random`` runs the random-neuron baseline into RUN/neurons/random/."""

from __future__ import annotations

from ..registry import Instrument
from ..runs import Stage
from .options import AblateOptions, AttributeOptions, FindOptions, MineOptions, Which
from .results import AblateResult, AttributeResult, FindResult, MineResult


def _dir(which: str) -> str:
    return "neurons" if which == "top" else "neurons/random"


def stage_find(model, run, opts: FindOptions, progress: bool = True) -> FindResult:
    """neurons.find: :func:`headscope.neurons.stages.run_find`, its summary typed."""
    from .stages import run_find
    return FindResult.from_json({"which": opts.which, **run_find(model, run, opts, progress=progress)})


def stage_mine(model, run, opts: MineOptions, progress: bool = True) -> MineResult:
    """neurons.mine: :func:`headscope.neurons.stages.run_mine`, its summary typed."""
    from .stages import run_mine
    return MineResult.from_json({"which": opts.which, **run_mine(model, run, opts, progress=progress)})


def stage_attribute(model, run, opts: AttributeOptions, progress: bool = True) -> AttributeResult:
    """neurons.attribute: :func:`headscope.neurons.stages.run_attribute`, its summary typed."""
    from .stages import run_attribute
    return AttributeResult.from_json({"which": opts.which, **run_attribute(model, run, opts, progress=progress)})


def stage_ablate(model, run, opts: AblateOptions, progress: bool = True) -> AblateResult:
    """neurons.ablate: :func:`headscope.neurons.stages.run_ablate`, its summary typed (``vs_random`` once both
    sets were ablated)."""
    from .stages import run_ablate
    return AblateResult.from_json({"which": opts.which, **run_ablate(model, run, opts, progress=progress)})


def report_find(summary: FindResult, opts: FindOptions, run) -> None:
    from ..runs import read_json
    path = run / _dir(opts.which) / "find.json"
    found = read_json(path)["neurons"]
    print(f"{len(found)} {opts.which} neurons in {path}")
    for n in found[:10]:
        print(f"  L{n['layer']}.N{n['neuron']}  token {n['token']!r}  dot {n['dot']:.3f}  cos {n['cos']:.3f}  "
              f"kurtosis {n['kurtosis']:.1f}  skew {n['skew']:.2f}")


def report_summary(summary: MineResult | AttributeResult, opts, run) -> None:
    print(", ".join(f"{k}: {v}" for k, v in summary.to_json().items() if not isinstance(v, (dict, list))))


def report_ablate(res: AblateResult, opts, run) -> None:
    fmt = lambda x: "n/a" if x is None else f"{x:.4g}"
    e = res.effect
    print(f"{res.pairs} pairs over {res.neurons} neurons; per-neuron effect (mean drop active − inactive) "
          f"{fmt(e.mean)} [{fmt(e.low)}, {fmt(e.high)}], Wilcoxon p = {fmt(res.wilcoxon.p)}; "
          f"{res.significant_bh} pairs significant (document-clustered bootstrap, BH q < 0.05)")
    if res.vs_random is not None:
        v = res.vs_random
        print(f"random neurons: effect {fmt(v.random.mean)}; congruent − random {fmt(v.difference.diff)} "
              f"[{fmt(v.difference.low)}, {fmt(v.difference.high)}], Mann–Whitney p = {fmt(v.mann_whitney.p)}")


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
        Stage("neurons.find", FindOptions, "headscope.neurons.instrument:stage_find", result=FindResult,
              writes=lambda o: [f"{_dir(o.which)}/find.json"],
              doc="next-token neurons ranked by congruence", report="headscope.neurons.instrument:report_find"),
        Stage("neurons.mine", MineOptions, "headscope.neurons.instrument:stage_mine", result=MineResult,
              reads=lambda o: [f"{_dir(o.which)}/find.json"], writes=lambda o: [f"{_dir(o.which)}/mine.json"],
              doc="max-activating prompts of each neuron", report="headscope.neurons.instrument:report_summary"),
        Stage("neurons.attribute", AttributeOptions, "headscope.neurons.instrument:stage_attribute",
              result=AttributeResult, reads=lambda o: [f"{_dir(o.which)}/mine.json"],
              writes=lambda o: [f"{_dir(o.which)}/attribution.json"],
              doc="head → neuron attribution on those prompts", report="headscope.neurons.instrument:report_summary"),
        Stage("neurons.ablate", AblateOptions, "headscope.neurons.instrument:stage_ablate", result=AblateResult,
              reads=lambda o: [f"{_dir(o.which)}/attribution.json"], writes=lambda o: [f"{_dir(o.which)}/ablation.json"],
              doc="drop in P(token) when a head is ablated, active vs inactive prompts",
              report="headscope.neurons.instrument:report_ablate"),
    ),
    atlas_data="headscope.neurons.atlas_data:atlas_data",
    loaders=(("load", "headscope.neurons.instrument:load"),),
)
