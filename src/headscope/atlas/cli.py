"""``headscope atlas build RUN_DIR`` and ``headscope atlas serve RUN_DIR`` (declared in ``atlas/instrument.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import HeadscopeError


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


def _load(args, run_dir: Path):
    if args.no_model:
        return None
    spec = model_spec_for(run_dir, args.model)
    if spec is None:
        print("headscope: note: the run's model is unknown (pass --model) — building without it", file=sys.stderr)
        return None
    from ..models.load import load_model
    model = load_model(spec, device=args.device, dtype=args.dtype)
    from ..runs import read_json
    model.check_identity(read_json(run_dir / "run.json").get("model", {}), f"run directory {run_dir}")
    return model


def _run_dir(text: str) -> Path:
    p = Path(text)
    if not (p / "run.json").is_file():
        raise HeadscopeError(f"not a headscope run directory (no run.json): {p}")
    return p


def cmd_build(args) -> int:
    from .build import DEFAULT_EXAMPLES, build_atlas
    run_dir = _run_dir(args.run_dir)
    model = _load(args, run_dir)
    res = build_atlas(run_dir, model=model, examples=args.example or DEFAULT_EXAMPLES)
    print(f"atlas: {res['n_pages']} pages, sections: {', '.join(res['sources']) or 'none yet'}", file=sys.stderr)
    print(Path(res["index"]).resolve().as_uri())
    return 0


def cmd_serve(args) -> int:
    from .build import DEFAULT_EXAMPLES, build_atlas
    from .server import bind, make_server
    run_dir = _run_dir(args.run_dir)
    bind(args.host, args.port).close()  # a bad --host/--port fails now, before the model loads
    model = _load(args, run_dir)
    if args.rebuild or not (run_dir / "atlas" / "index.html").is_file():
        build_atlas(run_dir, model=model, examples=DEFAULT_EXAMPLES)
    server = make_server(run_dir, model=model, host=args.host, port=args.port, verbose=args.verbose,
                         allow_hosts=args.allow_host or ())
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
