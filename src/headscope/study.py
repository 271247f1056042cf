"""``headscope demo`` and ``headscope study CONFIG``: the whole pipeline from a model to the atlas.

A study config is a TOML file: a ``[study]`` table (model, device, dtype, corpus, out) and one table per
stage, named as in :data:`STAGES` (``[heads]``, ``[lens]``, ``[neurons.find]`` …). A stage runs when its
table is present (and has no ``enabled = false``); the other keys of the table are the keyword options
of the stage's Python function, checked against its signature before anything runs. ``layers`` may be
written as a string (``"all"``, ``"-4"``, ``"10-13"``). ``run = "headscope.pkg.module:function"``
replaces a stage's function (only functions inside the ``headscope`` package).

Every stage is resumable: a finished stage is recorded in ``run.json`` (``study.<stage>``) with a hash
of its options; a second run skips it unless its options changed. ``RUN/study.json`` keeps the config,
the model spec and per-stage timings. ``headscope demo`` is the study of ``configs/demo.toml``
(``--small``: ``configs/ci.toml``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import HeadscopeError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a ``run_*(model, run, **options) -> dict`` function and the artifacts
    (paths relative to the run directory) it must leave behind."""

    name: str
    func: str
    """``module:function``."""
    artifacts: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    """Stages that must have run before this one (in this or an earlier invocation)."""
    doc: str = ""


STAGES: tuple[Stage, ...] = (
    Stage("heads", "headscope.heads.scores:run_head_scores", ("heads/scores.json",),
          doc="induction, previous-token, duplicate-token and prefix-induction scores of every head"),
    Stage("lens", "headscope.study_stages:run_lens_train", ("lens/lenses.json",),
          doc="per-head lenses for a few layers"),
    Stage("lens.eval", "headscope.lens.evaluate:run_eval", ("lens/eval.json",), needs=("lens",),
          doc="held-out KL of each lens against the unembedding baseline"),
    Stage("sae", "headscope.sae.train:run_train", ("sae/{sae}/cfg.json",), doc="one attention-output SAE"),
    Stage("sae.eval", "headscope.sae.evaluate:run_eval", ("sae/{sae}/eval.json",), needs=("sae",),
          doc="SAE metrics: L0, explained variance, CE/KL recovered, density"),
    Stage("sae.analysis", "headscope.sae.analysis:run_analysis", ("sae/{sae}/heads.json",), needs=("sae",),
          doc="head attribution of the features; polysemanticity of each head"),
    Stage("sae.dashboards", "headscope.sae.dashboards:run_dashboards", ("sae/{sae}/dashboards/index.json",),
          needs=("sae",), doc="feature pages: max-activating examples, DFA, logits, density"),
    Stage("sae.ioi", "headscope.sae.ioi:run_ioi", ("sae/{sae}/ioi.json",), needs=("sae",),
          doc="IOI worked example: logit difference when each live feature is ablated at S2"),
    Stage("neurons.find", "headscope.neurons.stages:run_find", ("neurons/find.json",),
          doc="next-token neurons ranked by congruence"),
    Stage("neurons.mine", "headscope.neurons.stages:run_mine", ("neurons/mine.json",), needs=("neurons.find",),
          doc="max-activating prompts of each neuron"),
    Stage("neurons.attribute", "headscope.neurons.stages:run_attribute", ("neurons/attribution.json",),
          needs=("neurons.mine",), doc="head → neuron attribution on those prompts"),
    Stage("explain", "headscope.explain.stages:run_explain", ("explain",), needs=("neurons.attribute",),
          doc="written explanations of when each head drives a neuron"),
    Stage("explain.score", "headscope.explain.stages:run_score", ("explain",), needs=("explain",),
          doc="explanation scores on held-out prompts"),
    Stage("explain.baseline", "headscope.explain.stages:run_random_baseline", ("explain/random",),
          needs=("explain.score",), doc="random-neuron baseline through the same pipeline, for comparison"),
    Stage("neurons.ablate", "headscope.neurons.stages:run_ablate", ("neurons/ablation.json",),
          needs=("neurons.attribute",), doc="drop in P(token) when a head is ablated, active vs inactive prompts"),
    Stage("atlas", "headscope.atlas.build:run_atlas", ("atlas/index.html", "atlas/data/index.js"),
          doc="the head atlas web page"),
)
STAGE_BY_NAME = {s.name: s for s in STAGES}
STUDY_KEYS = {"model", "device", "dtype", "corpus", "out", "name"}


def stage_table(config: dict, name: str):
    """The table of ``name`` (dotted names are nested tables in TOML), or None."""
    node = config
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if not isinstance(node, dict):
        raise HeadscopeError(f"config: [{name}] must be a table")
    sub = {s.name.split(".")[-1] for s in STAGES if s.name.startswith(name + ".")}
    return {k: v for k, v in node.items() if k not in sub}


def _unknown_tables(config: dict, prefix: str = "") -> list[str]:
    bad = []
    for k, v in config.items():
        full = f"{prefix}{k}"
        if not prefix and k == "study":
            continue
        is_stage = full in STAGE_BY_NAME or any(s.name.startswith(full + ".") for s in STAGES)
        if isinstance(v, dict) and is_stage:
            bad += _unknown_tables(v, full + ".")
        elif isinstance(v, dict) and not prefix:
            bad.append(full)  # a top-level table that is no stage (inside a stage, a dict is an option)
        elif not prefix:
            bad.append(full)
    return bad


def load_config(path: str | Path) -> dict:
    """Read and check a study TOML file (unknown tables/keys are errors, with the valid names)."""
    path = Path(path)
    if not path.is_file():
        raise HeadscopeError(f"study config not found: {path}")
    try:
        config = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise HeadscopeError(f"study config {path} is not valid TOML: {e}") from None
    bad = _unknown_tables(config)
    if bad:
        raise HeadscopeError(f"study config {path}: unknown table(s) {', '.join(bad)}; stages are "
                             f"{', '.join(s.name for s in STAGES)} (plus [study])")
    extra = set(config.get("study", {})) - STUDY_KEYS
    if extra:
        raise HeadscopeError(f"study config {path}: unknown [study] key(s) {', '.join(sorted(extra))}; "
                             f"valid: {', '.join(sorted(STUDY_KEYS))}")
    return config


def builtin_config(name: str) -> Path:
    """Path of a config shipped with headscope (``demo``, ``ci``)."""
    p = Path(str(resources.files("headscope") / "configs" / f"{name}.toml"))
    if not p.is_file():
        raise HeadscopeError(f"no built-in config '{name}'")
    return p


def _resolve(stage: Stage, table: dict):
    ref = table.get("run", stage.func)
    if not isinstance(ref, str) or ":" not in ref or not ref.startswith("headscope."):
        raise HeadscopeError(f"[{stage.name}] run = {ref!r}: write 'headscope.module:function'")
    mod_name, fn_name = ref.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and mod_name.startswith(e.name):
            return None  # that instrument is not part of this build
        raise
    fn = getattr(mod, fn_name, None)
    if fn is None:
        return None
    return fn


def _kwargs_dataclass(fn) -> list[str] | None:
    """Field names of the ``TrainConfig`` dataclass that a ``**options`` stage function forwards its
    keyword options to (looked up in the function's module), or None."""
    params = inspect.signature(fn).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    cls = getattr(inspect.getmodule(fn), "TrainConfig", None)
    fields = getattr(cls, "__dataclass_fields__", None)
    return list(fields) if fields else None


@dataclass
class Plan:
    """The checked list of stages to run: (stage, function, options)."""

    steps: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    """Stages the config asks for whose instrument is not in this build: (name, function ref)."""


def plan(config: dict, only: list[str] | None = None) -> Plan:
    """Check every stage's options against its function's signature before anything runs."""
    out = Plan()
    for stage in STAGES:
        table = stage_table(config, stage.name)
        if table is None or table.get("enabled", True) is False:
            continue
        if only and stage.name not in only:
            continue
        fn = _resolve(stage, table)
        if fn is None:
            out.missing.append((stage.name, table.get("run", stage.func)))
            continue
        opts = {k: v for k, v in table.items() if k not in ("run", "enabled")}
        params = inspect.signature(fn).parameters
        allowed = [p for p in list(params)[2:] if params[p].kind != params[p].VAR_KEYWORD]
        extra = _kwargs_dataclass(fn)
        if extra is not None:  # run_train(model, run, layer, **TrainConfig fields)
            allowed += [f for f in extra if f not in allowed]
        if extra is not None or not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            bad = [k for k in opts if k not in allowed]
            if bad:
                raise HeadscopeError(f"[{stage.name}] unknown option(s) {', '.join(bad)}; "
                                     f"{stage.func.split(':')[1]} accepts: {', '.join(allowed)}")
        out.steps.append((stage, fn, opts))
    if only:
        unknown = [n for n in only if n not in STAGE_BY_NAME]
        if unknown:
            raise HeadscopeError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGE_BY_NAME)}")
    return out


def _options_hash(opts: dict) -> str:
    return hashlib.sha1(json.dumps(opts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _prepare(fn, opts: dict, model, study: dict, changed: bool, stage: Stage | None = None,
             config: dict | None = None) -> dict:
    from .cli import parse_layers
    from .study_stages import sae_name
    params = inspect.signature(fn).parameters
    kw = dict(opts)
    if stage is not None and stage.name.startswith("sae.") and "name" in params and "name" not in kw:
        name = sae_name(config or {})
        if name is None:
            raise HeadscopeError(f"[{stage.name}] needs the SAE's name: set name in [sae] or [{stage.name}]")
        kw["name"] = name
    for key in ("layers",):
        if isinstance(kw.get(key), str):
            kw[key] = parse_layers(kw[key], model.n_layers)
    takes_corpus = "corpus" in params or "corpus" in (_kwargs_dataclass(fn) or [])
    if takes_corpus and "corpus" not in kw and "corpus" in study:
        kw["corpus"] = study["corpus"]
    if changed and "force" in params and "force" not in kw:
        kw["force"] = True
    return kw


def _small(summary) -> dict:
    """A compact, JSON-safe version of a stage's returned summary for study.json."""
    if not isinstance(summary, dict):
        return {}
    out = {}
    for k, v in summary.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, dict)) and len(json.dumps(v, default=str)) < 400:
            out[k] = json.loads(json.dumps(v, default=str))
    return out


def run_study(config: dict, out: str | Path | None = None, model=None, only: list[str] | None = None,
              force: list[str] | None = None, progress: bool = True) -> dict:
    """Run the stages of ``config`` into the run directory; returns ``study.json``'s content.

    ``model``: an already loaded model (else ``[study].model`` is loaded). ``only``: run just these
    stages. ``force``: rerun these stages even when finished."""
    from .runs import RunDir, read_json, write_json
    study = dict(config.get("study", {}))
    out = Path(out or study.get("out") or "runs/study")
    steps = plan(config, only)
    for name, ref in steps.missing:
        print(f"headscope: note: stage '{name}' skipped: {ref} is not part of this build", file=sys.stderr)
    if model is None:
        from .models.load import load_model
        print(f"study: loading model '{study.get('model', 'default')}'", file=sys.stderr, flush=True)
        model = load_model(study.get("model", "default"), device=study.get("device", "cpu"),
                           dtype=study.get("dtype", "float32"))
    run = RunDir(out, model.identity())
    record_path = run / "study.json"
    record = read_json(record_path) if record_path.is_file() else {}
    record.update({"model": {"spec": study.get("model", "default"), "name": model.name,
                             "device": study.get("device", "cpu"), "dtype": study.get("dtype", "float32")},
                   "config": config})
    record.setdefault("stages", {})
    write_json(record_path, record)
    n = len(steps.steps)
    ran_any = False
    for i, (stage, fn, opts) in enumerate(steps.steps, 1):
        h = _options_hash(opts)
        key = f"study.{stage.name}"
        done = run.is_done(key)
        prev_hash = run.info.get("stages", {}).get(key, {}).get("options")
        forced = stage.name in (force or [])
        changed = done and prev_hash != h
        for need in stage.needs:
            if not run.is_done(f"study.{need}") and need not in [s.name for s, _, _ in steps.steps[:i - 1]]:
                raise HeadscopeError(f"stage '{stage.name}' needs '{need}' first: add [{need}] to the config")
        if done and not changed and not forced and not (stage.name == "atlas" and ran_any):
            print(f"study: [{i}/{n}] {stage.name}: done earlier, reused", file=sys.stderr, flush=True)
            continue
        why = " (options changed)" if changed else (" (forced)" if forced else "")
        print(f"study: [{i}/{n}] {stage.name}{why}: {stage.doc}", file=sys.stderr, flush=True)
        kw = _prepare(fn, opts, model, study, changed or forced, stage, config)
        t0, c0 = time.time(), time.process_time()
        summary = fn(model, run, **kw)
        seconds, cpu = time.time() - t0, time.process_time() - c0
        from .study_stages import sae_name
        arts = [a.replace("{sae}", str(kw.get("name") or sae_name(config) or "")) for a in stage.artifacts]
        missing = [a for a in arts if not (run / a).exists()]
        if missing:
            raise HeadscopeError(f"stage '{stage.name}' finished without writing {', '.join(missing)}")
        run.mark_done(key, {"options": h, "seconds": round(seconds, 2)})
        record = read_json(record_path)
        record.setdefault("stages", {})[stage.name] = {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
                                                      "options": opts,
                                                      "summary": _small(summary), "finished": time.time()}
        write_json(record_path, record)
        ran_any = True
        print(f"study: [{i}/{n}] {stage.name}: finished in {seconds:.1f} s", file=sys.stderr, flush=True)
    return read_json(record_path)


def _print_summary(record: dict, run_dir: Path) -> None:
    stages = record.get("stages", {})
    total = sum(s.get("seconds", 0) for s in stages.values())
    print("study: stage times: " + ", ".join(f"{k} {v.get('seconds', 0):.0f}s" for k, v in stages.items())
          + f" (total {total:.0f}s)", file=sys.stderr)
    index = run_dir / "atlas" / "index.html"
    if index.is_file():
        print(f"study: the atlas is at {index.resolve().as_uri()}", file=sys.stderr)
        print(f"study: live prompts: headscope atlas serve {run_dir}", file=sys.stderr)
        print(index.resolve().as_uri())


def cmd_study(args) -> int:
    config = load_config(args.config)
    return _run(args, config)


def cmd_demo(args) -> int:
    config = load_config(builtin_config("ci" if args.small else "demo"))
    return _run(args, config)


def _run(args, config: dict) -> int:
    study = config.setdefault("study", {})
    for key in ("model", "device", "dtype"):
        if getattr(args, key, None) is not None:
            study[key] = getattr(args, key)
    if args.out:
        study["out"] = args.out
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    force = [s.strip() for s in args.force.split(",")] if args.force else None
    record = run_study(config, out=study.get("out"), only=only, force=force)
    _print_summary(record, Path(study.get("out") or "runs/study"))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="override [study].model")
    p.add_argument("--device", default=None, help="override [study].device")
    p.add_argument("--dtype", default=None, help="override [study].dtype")
    p.add_argument("--out", default=None, help="run directory (overrides [study].out)")
    p.add_argument("--only", default=None, metavar="STAGES", help="run only these stages (comma-separated)")
    p.add_argument("--force", default=None, metavar="STAGES", help="rerun these stages even if finished")


def register(sub) -> None:
    d = sub.add_parser("demo", help="the main job: every instrument on the default model, then the atlas (~15 min on CPU)")
    d.add_argument("--small", action="store_true", help="a few-minute version (the CI's configs/ci.toml)")
    _common(d)
    d.set_defaults(func=cmd_demo)
    s = sub.add_parser("study", help="run the pipeline from a TOML config (one table per stage)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("config", metavar="CONFIG", help="TOML file (see src/headscope/configs/demo.toml)")
    _common(s)
    s.set_defaults(func=cmd_study)
