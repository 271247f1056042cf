"""``headscope atlas build RUN_DIR`` and ``headscope atlas serve RUN_DIR``: commands ``fn(run, opts)`` (declared in
``atlas/instrument.py``, their options in ``atlas/options.py``)."""

from __future__ import annotations

import sys
from pathlib import Path


def model_spec_for(run_dir: Path, given: str | None) -> str | None:
    """The model to load for a run: ``given``, else the spec a study recorded (``RUN/study.json``),
    else ``default`` when the run was made with the embedded model; None when unknown."""
    if given:
        return given
    from ..runs import read_json
    study = Path(run_dir) / "study.json"
    if study.is_file():
        spec = read_json(study).get("model", {}).get("spec")
        if spec:
            return spec
    run = Path(run_dir) / "run.json"
    if run.is_file():
        from ..models.load import DEFAULT_NAME
        if read_json(run).get("model", {}).get("model") == DEFAULT_NAME:
            return "default"
    return None


def _load(opts, run_dir: Path):
    if opts.no_model:
        return None
    spec = model_spec_for(run_dir, opts.model)
    if spec is None:
        print("headscope: note: the run's model is unknown (pass --model) — building without it", file=sys.stderr)
        return None
    from ..models.load import load_model
    model = load_model(spec, device=opts.device, dtype=opts.dtype)
    from ..runs import read_json
    model.check_identity(read_json(run_dir / "run.json").get("model", {}), f"run directory {run_dir}")
    return model


def cmd_build(run, opts) -> int:
    from .build import DEFAULT_EXAMPLES, build_atlas
    run_dir = run.path
    model = _load(opts, run_dir)
    res = build_atlas(run_dir, model=model, examples=opts.example or DEFAULT_EXAMPLES)
    print(f"atlas: {res['n_pages']} pages, sections: {', '.join(res['sources']) or 'none yet'}", file=sys.stderr)
    print(Path(res["index"]).resolve().as_uri())
    return 0


def cmd_serve(run, opts) -> int:
    from .build import DEFAULT_EXAMPLES, build_atlas
    from .server import bind, make_server
    run_dir = run.path
    bind(opts.host, opts.port).close()  # a bad --host/--port fails now, before the model loads
    model = _load(opts, run_dir)
    if opts.rebuild or not (run_dir / "atlas" / "index.html").is_file():
        build_atlas(run_dir, model=model, examples=DEFAULT_EXAMPLES)
    server = make_server(run_dir, model=model, host=opts.host, port=opts.port, verbose=opts.verbose,
                         allow_hosts=opts.allow_host or ())
    host, port = server.server_address[:2]
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"headscope: warning: serving on {host}, reachable from other machines", file=sys.stderr)
    print(f"atlas: serving {run_dir}/atlas at http://{host}:{port}/ "
          f"(live prompts {'on' if model is not None else 'off'}; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
