"""Run directories: where every stage writes its JSON and safetensors artifacts.

Layout (each stage owns a sub-folder)::

    RUN_DIR/
      run.json                 format version, model identity, creation time
      heads/scores.json ...    head scores (this module's neighbours own their folders:
      lens/ sae/ neurons/ atlas/  lenses, SAEs, next-token neurons, the web page)

Every write is atomic (a temporary file renamed into place), so an interrupted stage never leaves a
half-written artifact that a later stage would take as complete. How a stage is declared and when its result is reused is
the *stage contract* (:class:`Stage`, :func:`run_stage`; docs/design.md § Stage contract): a stage is a
function of (model, run, options); its record ``RUN/stages/<name>.json`` holds the hash of its options and of
every artifact it read and wrote — and of the content of every file or folder its options name (a corpus:
:func:`external_inputs`) — and it is fresh only while all of them match.

Faults (docs/reliability.md): run-relative paths never leave the run (:func:`inside`); new folders outside
it are built beside their target under a unique temporary name (:func:`building_folder`); training
checkpoints are one file (:func:`write_checkpoint`); a failed stage's partial output is removed, and a
killed process' temporary files are removed at the next start while no other process holds the run
(:func:`using_run`).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import SafetensorError as SafetensorsError
from safetensors.torch import load_file, save_file

from .errors import HeadscopeError

FORMAT_VERSION = 1

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
"""Mode of every artifact: what ``open()`` would give (mkstemp's 0600 would hide atlas data from a web server)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


INDENT_BELOW = 256 * 1024
"""JSON up to this many characters (compact) is written indented, to be read by eye; larger artifacts stay
compact: Python's C encoder serves only ``indent=None``, and the pure-Python one took seconds per stage."""


def write_json(path: Path, obj) -> None:
    """Atomically write ``obj`` as JSON, indented when small (``INDENT_BELOW``); NaN/inf are rejected
    (write None instead)."""
    text = json.dumps(obj, allow_nan=False, separators=(",", ":"))
    if len(text) <= INDENT_BELOW:
        text = json.dumps(obj, indent=1, allow_nan=False)
    atomic_write_bytes(Path(path), (text + "\n").encode())


def read_json(path: Path):
    """Read JSON, with a one-line error for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise HeadscopeError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HeadscopeError(f"corrupt JSON file {path}: {e}") from None


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write a safetensors file (tensors made contiguous and moved to CPU)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file, with a one-line error for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise HeadscopeError(f"missing file: {path}")
    try:
        return load_file(str(path), device=device)
    except (SafetensorsError, OSError, ValueError, RuntimeError) as e:
        raise HeadscopeError(f"corrupt safetensors file {path}: {str(e).splitlines()[0]}") from None


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorsError, OSError, ValueError, RuntimeError) as e:
        raise HeadscopeError(f"corrupt safetensors file {path}: {str(e).splitlines()[0]}") from None


def commit_folder(staging: Path, final: Path) -> None:
    """Replace the folder ``final`` by ``staging`` (both in the same parent), so a multi-file artifact
    (a lens bank and its summary) changes as one: a reader sees all old files, then all new ones.

    The old folder is renamed aside first and removed after the new one is in place; a crash in between
    leaves ``final`` absent (never mixed) and the old copy under ``final.old-*``."""
    staging, final = Path(staging), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def staging_folder(final: Path) -> Path:
    """A new, empty, uniquely named folder beside ``final`` to write a multi-file artifact into before
    :func:`commit_folder`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{final.name}.staging-", dir=final.parent))


@contextmanager
def locked(path: Path):
    """An exclusive ``fcntl`` lock on ``path`` (created if needed) for a read-modify-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_HASH_CACHE: dict[tuple, str] = {}
PERSIST_HASHES_FROM = 1 << 20
"""Files of at least this many bytes keep their content hash on disk (``$HEADSCOPE_CACHE/hashes/``) across
processes, keyed by (path, size, mtime, inode), so a large corpus is read once, not at every stage check."""


def _hash_cache_file(key: tuple) -> Path:
    from .models.load import cache_dir
    return cache_dir() / "hashes" / hashlib.sha1(repr(key).encode()).hexdigest()[:32]


def file_hash(path: Path) -> str:
    """sha1 of a file's bytes, cached per (path, size, mtime, inode): within the process, and on disk for
    files of ``PERSIST_HASHES_FROM`` bytes or more. A file that cannot be read (``/proc/self/mem``, a
    folder without permission) is a one-line error."""
    try:
        st = os.stat(path)
        key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
        if key in _HASH_CACHE:
            return _HASH_CACHE[key]
        persist = st.st_size >= PERSIST_HASHES_FROM and os.path.isfile(path)
        if persist:
            cached = _hash_cache_file(key)
            if cached.is_file():
                text = cached.read_text().strip()
                if len(text) == 40:
                    _HASH_CACHE[key] = text
                    return text
        if not os.path.isfile(path):
            raise HeadscopeError(f"{path} is not a regular file")
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise HeadscopeError(f"cannot read {os.fsdecode(path)!r}: {e.strerror}") from None
    _HASH_CACHE[key] = h.hexdigest()
    if persist:
        try:
            atomic_write_bytes(_hash_cache_file(key), h.hexdigest().encode())
        except OSError:
            pass  # a read-only cache only costs the next process a re-read
    return _HASH_CACHE[key]


def inside(root: Path, rel: str, what: str = "path") -> Path:
    """``root / rel`` when ``rel`` stays inside ``root`` (relative, no ``..`` part, no NUL); else a one-line
    error. Every run-relative path a stage reads or writes goes through here, so a name taken from a config
    (an SAE's ``--name``) can never write outside the run directory."""
    rel = str(rel)
    if os.path.isabs(rel) or ".." in Path(rel).parts or "\0" in rel or not rel.strip():
        raise HeadscopeError(f"{what} {rel!r} would leave the run directory {root}")
    return Path(root) / rel


def external_inputs(opts) -> dict[str, str]:
    """Content hashes of the files and folders an options dataclass names (a corpus file or folder, an
    activation cache, an SAE to import, a reject list): ``{"file:<field>": sha1}`` for every string
    option whose value is an existing path. The stage contract compares them like run artifacts, so
    rewriting a corpus in place reruns the stages that read it."""
    import dataclasses
    from typing import Literal, get_origin
    from .options import field_types
    out = {}
    if not dataclasses.is_dataclass(opts):
        return out
    for f, tp in zip(dataclasses.fields(opts), field_types(type(opts)).values()):
        if get_origin(tp) is Literal or f.name in ("name", "layers", "heads"):
            continue  # a choice or a name, never a file (even where one of that name happens to exist)
        v = getattr(opts, f.name)
        if not isinstance(v, str) or not v or v == "default" or v.startswith("hf:") or "\0" in v:
            continue
        p = Path(v).expanduser()
        try:
            exists = p.exists()
        except (OSError, ValueError):
            continue
        if exists:
            out[f"file:{f.name}"] = artifact_hash(p)
    return out


@contextmanager
def building_folder(final: Path, what: str):
    """Build a new folder ``final`` (which must not exist) as one unit: yields a uniquely named temporary
    folder beside it (``.<name>.tmp-XXXX``, never an existing path) and renames it to ``final`` when the
    block ends without an error. On any error the temporary folder, and parent folders created for it,
    are removed, and a file-system error becomes a one-line :class:`HeadscopeError` naming ``what``."""
    final = Path(final)
    if final.exists() or final.is_symlink():
        raise HeadscopeError(f"{what} {final} exists: choose a new folder")
    created = []
    probe = final.parent
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    tmp, done = None, False
    try:
        for d in reversed(created):
            d.mkdir()
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        if final.exists():
            raise HeadscopeError(f"{what} {final} appeared while it was written: nothing written")
        os.rename(tmp, final)
        done = True
    except OSError as e:
        raise HeadscopeError(f"{what} {final}: cannot write: {e.strerror}") from None
    finally:
        if not done:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            for d in created:  # innermost first
                try:
                    d.rmdir()
                except FileNotFoundError:
                    continue  # never made
                except OSError:
                    break  # something else is in it now


CHECKPOINT_STATE_KEY = "headscope_state"


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """A training checkpoint as ONE file (tensors + the JSON ``state`` in the safetensors metadata),
    renamed into place: a kill at any moment leaves the previous checkpoint or the new one, never a mix."""
    write_tensors(path, tensors, metadata={CHECKPOINT_STATE_KEY: json.dumps(state),
                                           "step": str(state.get("step"))})


def read_checkpoint(path: Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict] | None:
    """``(tensors, state)`` of a checkpoint written by :func:`write_checkpoint`; None when there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    meta = read_metadata(path)
    if CHECKPOINT_STATE_KEY not in meta:
        return None  # an old two-file checkpoint (not crash-safe): the caller starts over
    try:
        state = json.loads(meta[CHECKPOINT_STATE_KEY])
    except json.JSONDecodeError as e:
        raise HeadscopeError(f"corrupt checkpoint {path}: {e}") from None
    return read_tensors(path, device=device), state


TEMP_NAME = re.compile(r"\.tmp($|[.-])|\.staging-|\.old-|^\.atlas\.(tmp|old)")
"""Names of the temporary files and folders headscope writes beside their targets (mkstemp's
``<name>.<rand>.tmp[.png]``, :func:`staging_folder`, :func:`commit_folder`'s ``.old-``, the atlas')."""


def clean_leftovers(root: Path) -> list[Path]:
    """Remove the temporary files/folders an interrupted process left in the run directory ``root``.
    Runs only when no other headscope process holds the run (the run lock, see :func:`using_run`)."""
    removed = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames) + filenames:
            if TEMP_NAME.search(name) and not name.endswith(".lock"):
                p = Path(dirpath) / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                    dirnames.remove(name)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


_HELD: dict[tuple[str, int], int] = {}
"""(run directory, thread) pairs that hold the run lock (:func:`using_run`), with the nesting depth."""


@contextmanager
def using_run(root: Path, create: bool = True):
    """Hold a shared ``flock`` on ``RUN/.run.lock`` for the block (a study, a stage, an atlas build, a
    command that writes into the run); when no other process holds it, first remove the leftovers of an
    interrupted one (:func:`clean_leftovers`). Re-entrant: a stage inside a study does not lock again. While
    any headscope process works in a run, its temporary files are live and nobody removes them.
    ``create=False`` (read-only commands): no lock file is created where there is none."""
    root = Path(root)
    key = (str(root.resolve()), threading.get_ident())  # threads building one atlas each hold their own lock
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    try:
        if not create and not (root / ".run.lock").is_file():
            raise FileNotFoundError
        f = open(root / ".run.lock", "a+b")
    except OSError:  # a read-only run: nothing to clean, nothing will be written
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            clean_leftovers(root)
        except BlockingIOError:
            pass
        fcntl.flock(f, fcntl.LOCK_SH)
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            fcntl.flock(f, fcntl.LOCK_UN)


def artifact_hash(path: Path) -> str | None:
    """sha1 of a file, or of a folder's files (names and contents, temporary files left out); None when
    the path does not exist."""
    path = Path(path)
    if path.is_file():
        return file_hash(path)
    if not path.is_dir():
        return None
    h = hashlib.sha1()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if ".tmp" in f.name or ".staging-" in rel or ".old-" in rel:
            continue
        h.update(f"{rel}\0{file_hash(f)}\n".encode())
    return h.hexdigest()


def check_out_path(out: str | Path) -> Path:
    """A usable run-directory path: not a file, and creatable/writable (checked before any work)."""
    if "\0" in str(out) or not str(out).strip():
        raise HeadscopeError(f"--out {str(out)!r} is not a usable path")
    out = Path(out)
    try:
        if out.exists() and not out.is_dir():
            raise HeadscopeError(f"--out {out} is a file, not a run directory")
        probe = out
        while not probe.exists():
            probe = probe.parent
    except OSError as e:
        raise HeadscopeError(f"--out {out}: {e.strerror}") from None
    if not os.access(probe, os.W_OK):
        raise HeadscopeError(f"--out {out}: {probe} is not writable")
    return out


class RunDir:
    """A run directory bound to one model. ``RunDir(path, model.identity())`` creates it or checks
    that an existing one was made for the same model and format version. ``RunDir(path)`` opens an
    existing one (one-line error when there is none)."""

    def __init__(self, path: str | Path, identity: dict | None = None):
        self.path = Path(path)
        meta = self.path / "run.json"
        if self.path.exists() and not self.path.is_dir():
            raise HeadscopeError(f"run directory {self.path} is a file: use another --out")
        if meta.exists():
            info = read_json(meta)
            if not isinstance(info, dict) or not isinstance(info.get("model", {}), dict):
                raise HeadscopeError(f"corrupt run directory {self.path}: run.json is not a headscope run record")
            if info.get("format_version") != FORMAT_VERSION:
                raise HeadscopeError(
                    f"run directory {self.path} has format version {info.get('format_version')}, this headscope "
                    f"reads version {FORMAT_VERSION}: start a new run directory")
            if identity is not None:
                saved = info.get("model", {})
                for key in ("n_layers", "n_heads", "d_model", "d_vocab", "unembed_sha1"):
                    if key in saved and saved[key] != identity.get(key):
                        raise HeadscopeError(
                            f"run directory {self.path} belongs to model '{saved.get('model')}', not "
                            f"'{identity.get('model')}': use another --out")
            self.info = info
        else:
            if identity is None:
                raise HeadscopeError(f"not a headscope run directory (no run.json): {self.path}")
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise HeadscopeError(f"cannot create run directory {self.path}: {e.strerror}") from None
            if not os.access(self.path, os.W_OK):
                raise HeadscopeError(f"run directory {self.path} is not writable")
            self.info = {"format_version": FORMAT_VERSION, "model": identity, "created": time.time()}
            write_json(meta, self.info)
            (self.path / ".run.lock").touch()  # see using_run

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel

    def record_path(self, stage: str) -> Path:
        return self.path / "stages" / f"{stage}.json"

    def record(self, stage: str) -> dict | None:
        """The stage's record (see :func:`run_stage`), or None when it never finished here."""
        p = self.record_path(stage)
        if not p.is_file():
            return None
        rec = read_json(p)
        if not isinstance(rec, dict):
            raise HeadscopeError(f"corrupt stage record {p}: delete it (the stage then runs again)")
        return rec

    @property
    def model_identity(self) -> dict:
        return self.info.get("model", {})


# ---------------------------------------------------------------------------------------------------------
# The stage contract

def _no_paths(opts) -> list[str]:
    return []


def resolve(ref: str) -> Callable:
    """``"headscope.pkg.module:function"`` → the function."""
    mod, _, name = ref.partition(":")
    fn = getattr(importlib.import_module(mod), name, None)
    if fn is None:
        raise HeadscopeError(f"{ref}: no such function")
    return fn


@dataclass(frozen=True)
class _Declared:
    """What a stage and a command both are: ``<instrument>.<step>``, its options dataclass and its function."""

    name: str
    """``<instrument>.<step>``: the CLI command ``headscope <instrument> <step>`` (and, for a stage, the study
    table ``[<instrument>.<step>]``)."""
    options: type
    """The options dataclass (see :mod:`headscope.options`)."""
    func: str
    """``"module:function"``."""

    @property
    def instrument(self) -> str:
        return self.name.split(".")[0]

    @property
    def step(self) -> str:
        return self.name.split(".", 1)[1]


@dataclass(frozen=True)
class Stage(_Declared):
    """One step of the pipeline. ``func`` (``"module:function"``) is ``fn(model, run, opts, progress) ->
    Result | dict`` (its summary, JSON values only: :func:`record_json`): it does its work unconditionally
    (whether to run at all is :func:`run_stage`'s decision) and writes the artifacts ``writes(opts)`` (paths
    relative to the run directory; files or folders). It may read only ``reads(opts)`` from the run directory
    (plus the model and corpora named by its options)."""

    reads: Callable[[Any], Iterable[str]] = _no_paths
    writes: Callable[[Any], Iterable[str]] = _no_paths
    doc: str = ""
    report: str | None = None
    """``"module:function"`` printing a short human summary after the CLI ran the stage: ``fn(summary, opts,
    run)``. Without it the CLI prints where the artifacts are."""
    result: type | None = None
    """The stage's typed result (a :class:`headscope.results.Result` subclass) when ``func`` returns one; the
    record keeps it whole (``"result"``) and a reused stage returns it rebuilt; returning anything else is
    an error. Every registered stage declares one; None (a stage that returns a dict) is left to tests."""


@dataclass(frozen=True)
class Command(_Declared):
    """A CLI command that is no pipeline stage (a query such as ``lens show``): ``fn(model, run, opts) ->
    int`` (``fn(run, opts)`` when ``needs_model`` is false). It keeps no record and is never skipped."""

    doc: str = ""
    needs_model: bool = True
    run_positional: bool = False
    """Take the run directory as a positional argument instead of ``--out``."""
    new_run: bool = False
    """The command may create the run directory (else the run directory must exist)."""


def check_inputs(run_path: Path, stage: Stage, opts, writer_of: Callable[[str], str | None] | None = None) -> dict:
    """Hash of every artifact ``stage`` reads; a one-line error naming the command that makes a missing one."""
    import dataclasses
    from .options import check_values
    if dataclasses.is_dataclass(opts):
        check_values(opts)  # the Python API gets the CLI's and the study's checks too
    inputs = {}
    for rel in stage.writes(opts):
        inside(run_path, rel, f"{stage.name} output")
    for rel in stage.reads(opts):
        h = artifact_hash(inside(run_path, rel, f"{stage.name} input"))
        if h is None:
            maker = writer_of(rel) if writer_of else None
            hint = f": run `headscope {maker.replace('.', ' ', 1)}` first" if maker else ""
            raise HeadscopeError(f"{stage.name} needs {Path(run_path) / rel}, which is missing{hint}")
        inputs[rel] = h
    inputs.update(external_inputs(opts))
    return inputs


def freshness(run: RunDir, stage: Stage, opts, inputs: dict) -> str | None:
    """None when the stage's record says its result is current; else why it must run."""
    from .options import options_hash
    rec = run.record(stage.name)
    if rec is None:
        return "not run yet"
    if stage.result is not None and "result" not in rec:
        return "its record has no typed result (written by an older headscope)"
    if rec.get("options_hash") != options_hash(opts):
        return "options changed"
    if rec.get("inputs") != inputs:
        changed = sorted(k for k in set(inputs) | set(rec.get("inputs", {}))
                         if inputs.get(k) != rec.get("inputs", {}).get(k))
        return f"input changed: {', '.join(changed)}"
    for rel, h in rec.get("outputs", {}).items():
        if artifact_hash(run / rel) != h:
            return f"output changed or missing: {rel}"
    return None


def run_stage(model, run: RunDir, stage: Stage, opts, *, force: bool = False, progress: bool = True,
              writer_of: Callable[[str], str | None] | None = None, primary: bool = True) -> tuple[dict, bool]:
    """Run ``stage`` unless its record says its result is current; returns ``(summary, ran)``.

    The record ``RUN/stages/<name>.json`` holds the options, their hash, the hashes of the artifacts the
    stage read (before it ran) and wrote. Any difference — other options, an upstream artifact rewritten,
    an output deleted or edited — makes the stage run again; since its outputs then change, every stage
    downstream of it is stale too, whether it is next run from the CLI or from a study. Under torchrun every
    rank runs the stage and only the ``primary`` one writes the record. A summary value that is not JSON is
    a :class:`HeadscopeError` (:func:`record_json`), and the stage's new output is removed like on any
    failure."""
    from .options import options_dict, options_hash
    inputs = check_inputs(run.path, stage, opts, writer_of)
    why = "forced" if force else freshness(run, stage, opts, inputs)
    if why is None:
        rec = run.record(stage.name)
        if stage.result is not None and "result" in rec:
            return stage.result.from_json(rec["result"]), False
        return rec.get("summary", {}), False
    fn = resolve(stage.func)
    t0, c0 = time.time(), time.process_time()
    before = _output_folders(run, stage.writes(opts))
    with using_run(run.path):
        try:
            summary = fn(model, run, opts, progress=progress)
            summary = {} if summary is None else summary
            if stage.result is not None and not isinstance(summary, stage.result):
                raise HeadscopeError(f"stage {stage.name} returned a {type(summary).__name__}, not its declared "
                                     f"{stage.result.__name__}")
            kept = record_json(stage.name, summary)
        except BaseException as e:
            if primary and not isinstance(e, KeyboardInterrupt):
                _remove_partial(before)
            if isinstance(e, OSError):
                raise HeadscopeError(f"{stage.name}: {os_error_text(e)}; its partial output was removed") from None
            raise
    seconds, cpu = time.time() - t0, time.process_time() - c0
    if not primary:  # torchrun: only rank 0 writes artifacts and the record
        return summary, True
    outputs = {}
    for rel in stage.writes(opts):
        h = artifact_hash(run / rel)
        if h is None:
            raise HeadscopeError(f"stage {stage.name} finished without writing {run / rel}")
        outputs[rel] = h
    write_json(run.record_path(stage.name), {
        "stage": stage.name, "options": options_dict(opts), "options_hash": options_hash(opts),
        "inputs": inputs, "outputs": outputs, "why": why, "finished": time.time(),
        "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), **kept})
    return summary, True


def _output_folders(run: RunDir, rels: Iterable[str]) -> dict[Path, set[str] | None]:
    """What the folders a stage writes into hold before it runs: folder → its entries (None: the folder, or
    an ancestor below the run directory, does not exist yet; then the topmost missing one is the key)."""
    out: dict[Path, set[str] | None] = {}
    for rel in rels:
        d = (run / rel).parent
        if d == run.path:
            if not (run / rel).exists():
                out[run / rel] = None
            continue
        top = None
        while d != run.path and not d.exists():
            top, d = d, d.parent
        if top is not None:
            out[top] = None
        elif d != run.path:
            out.setdefault(d, set(os.listdir(d)))
    return out


KEEP_ON_FAILURE = ("cache", "checkpoint")
"""Folders a failed stage leaves in place: resumable state by design (an SAE's or a lens' checkpoint, the
explainer's paid-for response cache)."""


def _remove_new(p: Path) -> None:
    if p.name in KEEP_ON_FAILURE:
        return
    if p.is_dir() and not p.is_symlink():
        for child in p.iterdir():
            _remove_new(child)
        try:
            p.rmdir()
        except OSError:
            pass  # it holds a kept folder
    else:
        p.unlink(missing_ok=True)


def _remove_partial(before: dict[Path, set[str] | None]) -> None:
    """Remove what a failed stage created in the folders it writes into (entries that were not there
    before it started; folders it created, whole, but for ``KEEP_ON_FAILURE``): no half-written output
    outlives a failure."""
    for d, names in before.items():
        try:
            if names is None:
                if d.exists() or d.is_symlink():
                    _remove_new(d)
                continue
            for name in set(os.listdir(d)) - names:
                _remove_new(d / name)
        except OSError:
            pass


def os_error_text(e: OSError) -> str:
    """One line for a file-system error: what failed, on which path (``ENOSPC``: the disk is full)."""
    what = e.strerror or str(e).splitlines()[0] if str(e) else type(e).__name__
    where = f" ({os.fsdecode(e.filename)!r})" if getattr(e, "filename", None) else ""
    return f"{what}{where}"


SUMMARY_MAX_CHARS = 2000
"""A value of a stage's summary whose JSON text is longer than this stays out of the record's compact
``summary`` (a typed result keeps it in ``result``)."""


def record_json(stage_name: str, summary) -> dict:
    """What the stage record keeps of a stage function's return value: ``{"summary": compact JSON}`` for a
    dict, plus ``"result"`` (the whole :meth:`~headscope.results.Result.to_json`) for a typed result. The
    check is strict: a value that is not JSON (a tensor, a numpy integer, NaN, a Path, a non-string key) is
    a :class:`HeadscopeError` naming the stage and the field, never dropped; so is a return value that is
    neither a :class:`~headscope.results.Result` nor a dict."""
    from .results import Result, check_json
    if isinstance(summary, Result):
        try:
            full = summary.to_json()
        except HeadscopeError as e:
            raise HeadscopeError(f"stage {stage_name}: {e}") from None
        return {"summary": _compact(full), "result": full}
    if not isinstance(summary, dict):
        raise HeadscopeError(f"stage {stage_name} returned a {type(summary).__name__}, not a Result or a dict")
    return {"summary": _compact(check_json(summary, f"stage {stage_name}: summary"))}


def _compact(summary: dict) -> dict:
    """The summary without its long values (:data:`SUMMARY_MAX_CHARS`); ``summary`` is already JSON."""
    return {k: v for k, v in summary.items() if len(json.dumps(v)) < SUMMARY_MAX_CHARS}


def update_json(path: Path, change: Callable[[dict], None]) -> dict:
    """Read-modify-write of a JSON file under an exclusive lock (``path`` + ``.lock``), so concurrent
    writers (two studies on one run directory) never lose each other's updates. Returns the new content."""
    path = Path(path)
    with locked(path.with_name(path.name + ".lock")):
        data = read_json(path) if path.is_file() else {}
        change(data)
        write_json(path, data)
    return data


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Save a matplotlib figure atomically (a uniquely named temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
