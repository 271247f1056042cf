"""The head-scores instrument: ``headscope heads score`` and the study's ``[heads.score]`` table."""

from __future__ import annotations

from ..registry import Instrument
from ..runs import Stage
from .options import RolesOptions, ScoreOptions
from .results import HeadScoresResult, RolesResult


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


def report_roles(result, opts, run) -> None:
    """Print the role census: per role, heads shown / ablated / confirmed, and what its control gives."""
    cen = result.census if hasattr(result, "census") else result.get("census", {})
    n = result.n_heads if hasattr(result, "n_heads") else result.get("n_heads")
    print(f"head roles of {n} heads in {run / 'heads' / 'roles.json'} (shown: score > control, BH q ≤ {opts.q}; "
          "confirmed: and its causal test passed)")
    for role, c in cen.items():
        ctrl = "" if c["control_over_threshold"] is None else f"; control ({c['control_name']}) over the " \
                                                               f"threshold: {c['control_over_threshold']} heads"
        conf = f"{c['confirmed']} confirmed of {c['ablated']} ablated" if c["causal"] else "no causal test"
        print(f"  {role.replace('_', '-'):17s} shown {c['shown']:3d}, {conf}{ctrl}")
    agr = result.agreement if hasattr(result, "agreement") else result.get("agreement", {})
    if agr.get("spearman") is not None:
        print(f"  attribution-patching screen vs real ablation: Spearman {agr['spearman']:.2f} over {agr['n']} heads")


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


def load_roles(model, run) -> dict:
    """RUN/heads/roles.json (checked against its contract, docs/roles.md): per role its score, control, CI,
    q-value and causal effect per head, and per head the roles shown and confirmed."""
    from ..errors import HeadscopeError
    from .verdict import load_roles as read_roles
    doc = read_roles(run.path)
    if doc is None:
        raise HeadscopeError(f"no head roles in {run.path}: run `run.heads.roles()` first")
    return doc


def load_verdicts(model, run) -> dict:
    """Every head's verdict (``"L.H"`` → :class:`headscope.heads.verdict.Verdict`), built from roles.json and the
    lens, SAE and look-up findings that passed their own tests."""
    from .verdict import run_verdicts
    return run_verdicts(run.path)


INSTRUMENT = Instrument(
    name="heads",
    help="head scores on synthetic sequences",
    stages=(
        Stage("heads.score", ScoreOptions, "headscope.heads.instrument:stage_score", result=HeadScoresResult,
              writes=lambda o: ["heads/scores.json", "heads/scores.safetensors"],
              doc="induction, previous-token, duplicate-token and prefix-induction scores of every head",
              report="headscope.heads.instrument:report"),
        Stage("heads.roles", RolesOptions, "headscope.heads.roles:run_roles",
              writes=lambda o: ["heads/roles.json", "heads/roles.safetensors"],
              doc="role battery of every head (induction, previous/duplicate-token, prefix induction, sink, local, "
                  "copying, copy suppression, successor) with controls, CIs, BH and causal checks",
              report="headscope.heads.instrument:report_roles", result=RolesResult),
    ),
    atlas_data="headscope.heads.atlas_data:atlas_data",
    loaders=(("load", "headscope.heads.instrument:load"), ("load_roles", "headscope.heads.instrument:load_roles"),
             ("load_verdicts", "headscope.heads.instrument:load_verdicts")),
)
