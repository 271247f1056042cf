"""``headscope demo`` and ``headscope study CONFIG``: the whole pipeline from a model to the atlas.

A study config is a TOML file:

* ``[study]``: model, device, dtype, corpus, out, name.
* one table per stage, named as the stage (``[heads.score]``, ``[lens.train]``, ``[sae.eval]`` …); its keys are
  the fields of the stage's options dataclass — the same options as the CLI flags, checked (names, types,
  ranges) before anything runs. A stage runs when its table is present and has no ``enabled = false``.
* keys directly in an instrument's table (``[sae] name = "L18"``) are shared by every stage of that
  instrument that has such an option; ``[study] corpus`` goes to every stage with a ``corpus`` option.
* ``[atlas]``: the atlas' build options. The atlas is built once, after the last stage (one build costs
  ~25 s on the demo's 2-core CPU); ``[study] refresh_atlas = "stage"`` rebuilds it after every stage that
  ran as well, so a long study's atlas can be opened early and watched as it fills in.

Every stage goes through the stage contract (:func:`headscope.runs.run_stage`), the same as from the CLI: a
stage is reused only while its options and the artifacts it read are unchanged, so changing an option reruns
that stage and everything downstream of it. ``RUN/study.json`` keeps the config, the model and per-stage
timings. ``headscope demo`` is the study of ``configs/demo.toml`` (``--small``: ``configs/ci.toml``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import HeadscopeError
from .options import field_names, from_table, options_dict

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

STUDY_KEYS = {"model", "device", "dtype", "corpus", "out", "name", "refresh_atlas"}
REFRESH_ATLAS = ("end", "stage")
DTYPES = ("float32", "bfloat16", "float16")


def load_config(path: str | Path) -> dict:
    """Read a study TOML file (its tables are checked by :func:`plan`)."""
    path = Path(path)
    if not path.is_file():
        raise HeadscopeError(f"study config not found: {path}")
    try:
        config = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise HeadscopeError(f"study config {path} is not valid TOML: {e}") from None
    plan(config)  # every table, key, type and range checked now
    return config


def builtin_config(name: str) -> Path:
    """Path of a config shipped with headscope (``demo``, ``ci``)."""
    p = Path(str(resources.files("headscope") / "configs" / f"{name}.toml"))
    if not p.is_file():
        raise HeadscopeError(f"no built-in config '{name}'")
    return p


@dataclass
class Plan:
    """The checked study: stages to run with their options, and the atlas' build options (None: no atlas)."""

    steps: list = field(default_factory=list)
    """(Stage, options) in pipeline order."""
    atlas: object | None = None


def plan(config: dict, only: list[str] | None = None) -> Plan:
    """Check the whole config against the registry and build every stage's options before anything runs."""
    from .atlas.options import BuildOptions
    from .registry import instruments, stages
    by_instrument = {ins.name: ins for ins in instruments()}
    study = config.get("study", {})
    if not isinstance(study, dict):
        raise HeadscopeError("config: [study] must be a table")
    extra = set(study) - STUDY_KEYS
    if extra:
        raise HeadscopeError(f"config: unknown [study] key(s) {', '.join(sorted(extra))}; "
                             f"valid: {', '.join(sorted(STUDY_KEYS))}")
    for key, value in study.items():
        if not isinstance(value, str) or not value.strip() or "\0" in value:
            raise HeadscopeError(f"config: [study] {key} = {value!r}: expected a non-empty string")
    if study.get("dtype", "float32") not in DTYPES:
        raise HeadscopeError(f"config: [study] dtype must be one of {', '.join(DTYPES)}, got {study['dtype']!r}")
    if study.get("refresh_atlas", "end") not in REFRESH_ATLAS:
        raise HeadscopeError(f"config: [study] refresh_atlas must be one of {', '.join(map(repr, REFRESH_ATLAS))}, "
                             f"got {study['refresh_atlas']!r}")
    for key, value in config.items():
        if key != "study" and (key not in by_instrument or not isinstance(value, dict)):
            raise HeadscopeError(f"config: unknown table [{key}]; tables are [study] and "
                                 f"{', '.join(f'[{n}]' for n in by_instrument)} with their stages")
    if not any(k != "study" for k in config):
        raise HeadscopeError("config: no stage tables: nothing to run (add e.g. [heads.score])")
    out = Plan()
    for ins in instruments():
        table = config.get(ins.name)
        if table is None:
            continue
        steps = {s.step: s for s in ins.stages}
        for k, v in table.items():
            if k in steps and not isinstance(v, dict):
                raise HeadscopeError(f"config: [{ins.name}.{k}] must be one table, not {type(v).__name__} "
                                     f"(write [{ins.name}.{k}], not [[{ins.name}.{k}]])")
        shared = {k: v for k, v in table.items() if not isinstance(v, dict)}
        for k, v in table.items():
            if isinstance(v, dict) and k not in steps:
                raise HeadscopeError(f"config: [{ins.name}.{k}] is no stage; {ins.name} has "
                                     f"{', '.join(f'[{s.name}]' for s in ins.stages) or 'no stages'}")
        _check_enabled(shared, f"[{ins.name}]")
        if ins.name == "atlas":
            if shared.pop("enabled", True) is not False:
                out.atlas = from_table(BuildOptions, shared, "[atlas]")
            continue
        used = set()
        for st in ins.stages:
            sub = table.get(st.step)
            if sub is None:
                continue
            sub = dict(sub)
            _check_enabled(sub, f"[{st.name}]")
            if sub.pop("enabled", True) is False or shared.get("enabled", True) is False:
                continue
            names = field_names(st.options)
            inherited = {k: v for k, v in shared.items() if k in names}
            used |= set(inherited)
            if "corpus" in names and "corpus" in study:
                inherited.setdefault("corpus", study["corpus"])
            opts = from_table(st.options, {**inherited, **sub}, f"[{st.name}]")
            _check_layer_syntax(opts, f"[{st.name}]")
            if not only or st.name in only:
                out.steps.append((st, opts))
        unused = set(shared) - used - {"enabled"}
        if unused:
            raise HeadscopeError(f"config: [{ins.name}] key(s) {', '.join(sorted(unused))} are options of none "
                                 f"of its stages in this config")
    if only:
        known = {s.name for s in stages()}
        bad = [n for n in only if n not in known]
        if bad:
            raise HeadscopeError(f"unknown stage(s) {', '.join(bad)}; stages are {', '.join(sorted(known))}")
    return out


def _check_enabled(table: dict, where: str) -> None:
    if "enabled" in table and not isinstance(table["enabled"], bool):
        raise HeadscopeError(f"config: {where} enabled = {table['enabled']!r}: expected true or false (no quotes)")


def _check_layer_syntax(opts, where: str) -> None:
    """A ``layers`` option that cannot be parsed fails in the plan, before the model loads."""
    from .sites import parse_layers
    text = getattr(opts, "layers", None)
    if isinstance(text, str):
        try:
            parse_layers(text, 100_000)  # syntax only: the range is checked once the model is loaded
        except HeadscopeError as e:
            if "out of range" not in str(e):
                raise HeadscopeError(f"config: {where} {e}") from None


def check_against_model(steps: "Plan", model) -> None:
    """Layer options of every planned stage checked against the loaded model, before the run directory
    is created (``layer = 99`` on a 30-layer model fails here, leaving nothing behind)."""
    from .sites import parse_layers
    n = model.n_layers
    for stage, opts in steps.steps:
        layer = getattr(opts, "layer", None)
        if isinstance(layer, int) and not isinstance(layer, bool) and not 0 <= layer < n:
            raise HeadscopeError(f"config: [{stage.name}] layer {layer} is out of range: the model has layers "
                                 f"0..{n - 1}")
        if isinstance(getattr(opts, "layers", None), str):
            try:
                parse_layers(opts.layers, n)
            except HeadscopeError as e:
                raise HeadscopeError(f"config: [{stage.name}] {e}") from None


def _refresh_atlas(run, model, atlas_opts) -> None:
    """Rebuild the atlas from whatever the run holds now (a failure is a warning: the study goes on)."""
    from .atlas.build import DEFAULT_EXAMPLES, build_atlas
    try:
        build_atlas(run.path, model=model, examples=list(atlas_opts.example) or DEFAULT_EXAMPLES)
    except HeadscopeError as e:
        print(f"headscope: warning: atlas not refreshed: {e}", file=sys.stderr)


def run_study(config: dict, out: str | Path | None = None, model=None, only: list[str] | None = None,
              force: list[str] | None = None, progress: bool = True) -> dict:
    """Run the stages of ``config`` into the run directory; returns ``study.json``'s content.

    ``model``: an already loaded model (else ``[study].model`` is loaded). ``only``: run just these
    stages. ``force``: rerun these stages even when up to date."""
    from .runs import RunDir, check_out_path, using_run
    study = dict(config.get("study", {}))
    out = check_out_path(out or study.get("out") or "runs/study")
    steps = plan(config, only)
    if force:
        bad = [n for n in force if n not in {s.name for s, _ in steps.steps}]
        if bad:
            raise HeadscopeError(f"--force {', '.join(bad)}: not a stage of this study")
    t_start = time.time()
    if model is None:
        from .models.load import load_model
        model = load_model(study.get("model", "default"), device=study.get("device", "cpu"),
                           dtype=study.get("dtype", "float32"))
    check_against_model(steps, model)
    print(f"study: model '{study.get('model', 'default')}' loaded ({time.time() - t_start:.1f} s)", file=sys.stderr,
          flush=True)
    created = not (Path(out) / "run.json").is_file()
    run = RunDir(out, model.identity())
    try:
        with using_run(run.path):
            return _run_steps(run, model, config, study, steps, force, progress, t_start)
    except HeadscopeError:
        if created:
            _remove_if_nothing_done(run.path)
        raise


def _remove_if_nothing_done(out: Path) -> None:
    """Remove a run directory this study created when it failed before any stage finished (its files are
    then only run.json, study.json and lock files): nothing half-written is left behind."""
    import shutil
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    if files <= {"run.json", "study.json", "study.json.lock", ".run.lock"}:
        shutil.rmtree(out, ignore_errors=True)


def _run_steps(run, model, config: dict, study: dict, steps: "Plan", force, progress: bool, t_start: float) -> dict:
    from .runs import read_json, run_stage, update_json
    record_path = run / "study.json"
    update_json(record_path, lambda r: r.update({
        "model": {"spec": study.get("model", "default"), "name": model.name,
                  "device": study.get("device", "cpu"), "dtype": study.get("dtype", "float32")},
        "config": config, "started": t_start}))
    opts_by_stage = {s.name: o for s, o in steps.steps}

    def writer(rel: str):
        from .registry import writer_of
        return writer_of(rel, opts_by_stage)

    n = len(steps.steps)
    ran_any = False
    for i, (stage, opts) in enumerate(steps.steps, 1):
        print(f"study: [{i}/{n}] {stage.name}: {stage.doc}", file=sys.stderr, flush=True)
        t0 = time.time()
        summary, ran = run_stage(model, run, stage, opts, force=stage.name in (force or []), progress=progress,
                                 writer_of=writer)
        rec = run.record(stage.name) or {}
        if not ran:
            print(f"study: [{i}/{n}] {stage.name}: up to date, reused", file=sys.stderr, flush=True)
            continue
        ran_any = True
        seconds = time.time() - t0
        update_json(record_path, lambda r: r.setdefault("stages", {}).__setitem__(stage.name, {
            "seconds": round(seconds, 2), "cpu_seconds": rec.get("cpu_seconds"), "why": rec.get("why"),
            "options": options_dict(opts), "summary": rec.get("summary", {}), "finished": time.time()}))
        print(f"study: [{i}/{n}] {stage.name}: finished in {seconds:.1f} s ({rec.get('why')})",
              file=sys.stderr, flush=True)
        if steps.atlas is not None and i < n and study.get("refresh_atlas", "end") == "stage":
            _refresh_atlas(run, model, steps.atlas)
    if steps.atlas is not None and (ran_any or not (run / "atlas" / "index.html").is_file()):
        t0 = time.time()
        _refresh_atlas(run, model, steps.atlas)
        update_json(record_path, lambda r: r.setdefault("stages", {}).__setitem__(
            "atlas", {"seconds": round(time.time() - t0, 2), "finished": time.time()}))
    if ran_any:  # the whole run, model load included
        update_json(record_path, lambda r: r.update({"wall_seconds": round(time.time() - t_start, 1)}))
    return read_json(record_path)


def _print_summary(record: dict, run_dir: Path) -> None:
    stages = record.get("stages", {})
    total = sum(s.get("seconds", 0) for s in stages.values())
    print("study: stage times: " + ", ".join(f"{k} {v.get('seconds', 0):.0f}s" for k, v in stages.items())
          + f" (total {total:.0f}s" + (f"; wall {record['wall_seconds']:.0f}s with the model load"
                                         if record.get("wall_seconds") else "") + ")", file=sys.stderr)
    index = run_dir / "atlas" / "index.html"
    if index.is_file():
        print(f"study: the atlas is at {index.resolve().as_uri()}", file=sys.stderr)
        print(f"study: live prompts: headscope atlas serve {run_dir}", file=sys.stderr)
        print(index.resolve().as_uri())


def cmd_study(args) -> int:
    return _run(args, load_config(args.config))


def cmd_demo(args) -> int:
    return _run(args, load_config(builtin_config("ci" if args.small else "demo")))


def _run(args, config: dict) -> int:
    study = config.setdefault("study", {})
    for key in ("model", "device", "dtype"):
        if getattr(args, key, None) is not None:
            study[key] = getattr(args, key)
    if args.out:
        study["out"] = args.out
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    force = [s.strip() for s in args.force.split(",")] if args.force else None
    out = study.get("out") or "runs/study"
    record = run_study(config, out=out, only=only, force=force)
    _print_summary(record, Path(out))
    return 0


def _common(p) -> None:
    from .options import add_model_args
    add_model_args(p, default=None)
    p.add_argument("--out", default=None, help="run directory (overrides [study].out)")
    p.add_argument("--only", default=None, metavar="STAGES", help="run only these stages (comma-separated)")
    p.add_argument("--force", default=None, metavar="STAGES", help="rerun these stages even if up to date")


def register(sub) -> None:
    d = sub.add_parser("demo", help="the main job: every instrument on the default model, then the atlas")
    d.add_argument("--small", action="store_true", help="a few-minute version (the CI's configs/ci.toml)")
    _common(d)
    d.set_defaults(func=cmd_demo)
    s = sub.add_parser("study", help="run the pipeline from a TOML config (one table per stage)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    s.add_argument("config", metavar="CONFIG", help="TOML file (see src/headscope/configs/demo.toml)")
    _common(s)
    s.set_defaults(func=cmd_study)
