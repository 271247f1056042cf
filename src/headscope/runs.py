"""Run directories: where every stage writes its JSON and safetensors artifacts.

Layout (each stage owns a sub-folder)::

    RUN_DIR/
      run.json                 format version, model identity, creation time
      heads/scores.json ...    head scores (this module's neighbours own their folders:
      lens/ sae/ neurons/ atlas/  lenses, SAEs, next-token neurons, the web page)

Every write is atomic (a temporary file renamed into place), so an interrupted stage never leaves a
half-written artifact that a later stage would take as complete. A stage records completion with
:meth:`RunDir.mark_done`; a second run skips what is done.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError as SafetensorsError
from safetensors.torch import load_file, save_file

from .errors import HeadscopeError

FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    """Atomically write ``obj`` as indented JSON (NaN/inf are rejected: write None instead)."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode())


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


class RunDir:
    """A run directory bound to one model. ``RunDir(path, model.identity())`` creates it or checks
    that an existing one was made for the same model and format version."""

    def __init__(self, path: str | Path, identity: dict | None = None):
        self.path = Path(path)
        meta = self.path / "run.json"
        if meta.exists():
            info = read_json(meta)
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
            self.info = {"format_version": FORMAT_VERSION, "model": identity, "created": time.time(), "stages": {}}
            write_json(meta, self.info)

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel

    def is_done(self, stage: str) -> bool:
        """Whether ``stage`` was recorded as complete."""
        return stage in read_json(self.path / "run.json").get("stages", {})

    def mark_done(self, stage: str, summary: dict | None = None) -> None:
        """Record ``stage`` as complete, with an optional small summary."""
        info = read_json(self.path / "run.json")
        info.setdefault("stages", {})[stage] = {"finished": time.time(), **(summary or {})}
        write_json(self.path / "run.json", info)
        self.info = info

    @property
    def model_identity(self) -> dict:
        return self.info.get("model", {})
