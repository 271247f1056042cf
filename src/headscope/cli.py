"""The ``headscope`` command, generated from the instrument registry.

Every stage and command of every instrument (:mod:`headscope.registry`) becomes ``headscope <instrument>
<step>``; its flags come from its options dataclass (:mod:`headscope.options`), plus the shared model flags
(``--model/--device/--dtype``), ``--out`` and, for stages, ``--force``. A stage run from here goes through
the same contract as in a study (:func:`headscope.runs.run_stage`): reused while fresh, rerun when its
options or its inputs changed. Errors a user can fix are :class:`HeadscopeError`: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import HeadscopeError
from .options import HelpFormatter, Parser, add_model_args, add_options
from .runs import check_out_path


def load_from_args(args):
    """Load the model named by ``--model/--device/--dtype``."""
    from .models.load import load_model
    return load_model(args.model, device=args.device, dtype=args.dtype)


def _stage_handler(stage):
    def handler(args) -> int:
        from .registry import writer_of
        from .options import check_values
        from .runs import RunDir, check_inputs, resolve, run_stage
        opts = args.opts
        check_values(opts)
        out = check_out_path(args.out)
        if list(stage.reads(opts)):
            if not (out / "run.json").is_file():
                maker = writer_of(next(iter(stage.reads(opts))))
                hint = f": run `headscope {maker.replace('.', ' ', 1)} --out {out}` first" if maker else ""
                raise HeadscopeError(f"no run directory at {out}{hint}")
            check_inputs(out, stage, opts, writer_of)
        from .distributed import Distributed
        dist = Distributed()  # torchrun: every rank runs the stage, rank 0 writes the record
        if dist.enabled:
            args.device = dist.device(args.device)
            dist.init(args.device)
        model = load_from_args(args)
        created = not out.exists()
        run = RunDir(out, model.identity()) if dist.primary else None
        dist.barrier()
        run = run or RunDir(out, model.identity())
        try:
            summary, ran = run_stage(model, run, stage, opts, force=args.force,
                                     progress=not args.quiet and dist.primary, writer_of=writer_of,
                                     primary=dist.primary)
        except HeadscopeError:
            if created and dist.primary:
                _remove_if_only_run_json(out)
            raise
        dist.destroy()
        if not dist.primary:
            return 0
        if not ran:
            print(f"headscope: {stage.name} is up to date in {out} (same options and inputs; --force reruns it)",
                  file=sys.stderr)
        if stage.report:
            resolve(stage.report)(summary, opts, run)
        else:
            print(f"{stage.name}: done; artifacts in {out}: {', '.join(stage.writes(opts))}")
        return 0
    return handler


def _remove_if_only_run_json(out: Path) -> None:
    """Undo a run directory this command created when its stage failed before writing anything (a bad
    option found once the model was loaded): nothing half-written is left behind."""
    import shutil
    files = [p for p in out.rglob("*") if p.is_file() and p.name != ".run.lock"]
    if [p.name for p in files] in (["run.json"], []):
        shutil.rmtree(out, ignore_errors=True)


def _command_handler(cmd):
    def handler(args) -> int:
        from .options import check_values
        from .runs import RunDir, resolve, using_run
        check_values(args.opts)
        out = Path(args.run_dir if cmd.run_positional else args.out)
        if cmd.new_run:
            check_out_path(out)
        elif not (out / "run.json").is_file():
            raise HeadscopeError(f"no run directory at {out} (no run.json)")
        fn = resolve(cmd.func)
        if not cmd.needs_model:
            run = RunDir(out)
            with using_run(run.path, create=False):
                return int(fn(run, args.opts) or 0)
        model = load_from_args(args)
        run = RunDir(out, model.identity())
        with using_run(run.path, create=False):
            return int(fn(model, run, args.opts) or 0)
    return handler


def _add_step(sub, item, is_stage: bool) -> None:
    opts_doc = (item.options.__doc__ or "").strip()
    p = sub.add_parser(item.step, help=item.doc, description=opts_doc or item.doc,
                       formatter_class=HelpFormatter)
    if is_stage or item.needs_model:
        add_model_args(p)
    if not is_stage and item.run_positional:
        p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    else:
        p.add_argument("--out", default="runs/default", metavar="RUN_DIR", help="run directory")
    if is_stage:
        p.add_argument("--force", action="store_true", help="rerun even when the result is up to date")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_options(p, item.options)
    p.set_defaults(func=_stage_handler(item) if is_stage else _command_handler(item))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .registry import instruments
    parser = Parser(
        prog="headscope",
        description="What does each attention head of a language model do? Head scores, lenses, "
                    "attention-output SAEs and head→neuron look-ups, shown in a head atlas.")
    parser.add_argument("--version", action="version", version=f"headscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ins in instruments():
        p = sub.add_parser(ins.name, help=ins.help, description=ins.description or ins.help)
        steps = p.add_subparsers(dest="step", metavar="STEP", required=True)
        for st in ins.stages:
            _add_step(steps, st, True)
        for cmd in ins.commands:
            _add_step(steps, cmd, False)
    from .study import register as register_study
    register_study(sub)
    return parser


QUIET_LIBRARIES = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                   "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
"""Set (unless already set) before transformers is imported: its "Loading weights" bars and load reports
would otherwise reach stderr before an error, which must be one line. Set e.g.
``HF_HUB_DISABLE_PROGRESS_BARS=0`` to see download bars."""


def main(argv: list[str] | None = None) -> int:
    for key, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(key, value)
    with _quiet_transformers():
        return _main(argv)


@contextmanager
def _quiet_transformers():
    """Where transformers was imported before ``main`` (a notebook, the tests), the environment variables
    come too late: turn its bars and warnings off for the command and back on after it."""
    tf = sys.modules.get("transformers")
    if tf is None or os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "1":
        yield
        return
    log = tf.utils.logging
    bars, verbosity = log.is_progress_bar_enabled(), log.get_verbosity()
    log.disable_progress_bar()
    log.set_verbosity_error()
    try:
        yield
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()


def _main(argv: list[str] | None) -> int:
    from .allocator import tune_allocator
    tune_allocator()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 1
        return int(args.func(args) or 0)
    except HeadscopeError as e:
        print(f"headscope: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused (read-only, full disk, EIO, a name too long): one line
        from .runs import os_error_text
        print(f"headscope: error: {os_error_text(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("headscope: interrupted; finished work is kept and a second run resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
