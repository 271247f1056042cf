"""The head-scores instrument: ``headscope heads score`` and the study's ``[heads.score]`` table."""

from __future__ import annotations

from ..registry import Instrument
from ..runs import Stage
from .options import ScoreOptions
from .results import HeadScoresResult


def stage_score(model, run, opts: ScoreOptions, progress: bool = True) -> HeadScoresResult:
    """heads.score: every head score into RUN/heads/ (:func:`headscope.heads.scores.run_head_scores`)."""
    from .scores import SCORES, run_head_scores, top_heads
    doc = run_head_scores(model, run, opts, progress=progress)
    pre = doc.get("prefix_induction")
    return HeadScoresResult(n_layers=doc["n_layers"], n_heads=doc["n_heads"], layers=list(doc["config"]["layers"]),
                            top={name: [list(t) for t in top_heads(doc["scores"][name])] for name in SCORES},
                            prefix_lengths=list(pre["prefix_lengths"]) if pre else None)


def report(summary, opts: ScoreOptions, run) -> None:
    """Print the top heads of each score (read from RUN/heads/scores.json)."""
    from ..runs import read_json
    from .scores import SCORES, top_heads
    doc = read_json(run / "heads" / "scores.json")
    print(f"head scores ({doc['n_layers']} layers × {doc['n_heads']} heads) in {run / 'heads'}")
    for name in SCORES:
        tops = ", ".join(f"{l}.{h}={v:.2f}" for l, h, v in top_heads(doc["scores"][name]))
        print(f"  top {name.replace('_', '-')} heads: {tops}")
    if doc.get("prefix_induction"):
        longest = doc["prefix_induction"]["scores"][-1]
        tops = ", ".join(f"{l}.{h}={v:.2f}" for l, h, v in top_heads(longest))
        print(f"  top prefix-induction heads (prefix {doc['prefix_induction']['prefix_lengths'][-1]}): {tops}")


def load(model, run) -> dict:
    """The head scores as tensors: ``induction``, ``prev_token``, ``duplicate_token`` ``[n_layers, n_heads]``
    (NaN for layers not scored) and, when computed, ``prefix_induction`` ``[n_prefix_lengths, n_layers,
    n_heads]`` (prefix lengths in RUN/heads/scores.json)."""
    from ..errors import HeadscopeError
    from ..runs import read_tensors
    path = run / "heads" / "scores.safetensors"
    if not path.is_file():
        raise HeadscopeError(f"no head scores in {run.path}: run `run.heads.score()` first")
    return read_tensors(path)


INSTRUMENT = Instrument(
    name="heads",
    help="head scores on synthetic sequences",
    stages=(
        Stage("heads.score", ScoreOptions, "headscope.heads.instrument:stage_score", result=HeadScoresResult,
              writes=lambda o: ["heads/scores.json", "heads/scores.safetensors"],
              doc="induction, previous-token, duplicate-token and prefix-induction scores of every head",
              report="headscope.heads.instrument:report"),
    ),
    atlas_data="headscope.heads.atlas_data:atlas_data",
    loaders=(("load", "headscope.heads.instrument:load"),),
)
