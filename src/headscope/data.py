"""Corpora → token batches: tokenize once, cache, pack into fixed-length sequences, split.

Corpus specs:

* ``default`` — English prose that ships with Python itself: the documentation topics of
  ``pydoc_data`` (the text of the language reference) followed by the docstrings (≥ 300 characters)
  of the standard library's modules, classes and functions. ~0.5M tokens with SmolLM2's tokenizer.
  Source: CPython, Python Software Foundation License.
* a ``.txt``/``.md`` file (one document) or a ``.jsonl`` file (one document per line, field ``text``);
* a folder (every ``.txt``, ``.md`` and ``.jsonl`` below it, in sorted order);
* ``hf:NAME[:CONFIG][:SPLIT]`` — a Hugging Face dataset's ``text`` field (needs ``datasets`` and a network).

Packing: documents are tokenized without special tokens and joined by EOS into one stream; sequence i
is ``[BOS] + stream[i·(S−1) : (i+1)·(S−1)]`` (BOS = the tokenizer's BOS, or EOS if it has none), so
every sequence starts with the same token, as tuned-lens does. The split is by document: a document
is held out when the SHA-1 of its text falls below ``holdout`` (deterministic, no leakage).
Token streams are cached as ``.npy`` files under ``$HEADSCOPE_CACHE/corpora`` and memory-mapped, so
memory does not grow with the corpus.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import HeadscopeError
from .models.load import Model, cache_dir
from .runs import atomic_write_bytes, file_hash

CORPUS_VERSION = 1
SPLITS = ("train", "heldout")


def _stdlib_docstrings() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "tkinter"}
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 300:
                    yield doc


def default_documents() -> Iterator[str]:
    """The default corpus: Python's documentation topics, then standard-library docstrings."""
    from pydoc_data import topics
    for key in sorted(topics.topics):
        yield topics.topics[key]
    yield from _stdlib_docstrings()


class _Replacements:
    count = 0


def _read_text(path: Path, stats: _Replacements) -> str:
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    if "\ufffd" in text and "\ufffd".encode() not in data:
        stats.count += text.count("\ufffd")
    return text


def iter_documents(spec: str, stats: _Replacements | None = None) -> Iterator[str]:
    """Documents (strings) of a corpus spec; non-UTF-8 bytes are replaced and counted in ``stats``."""
    stats = stats or _Replacements()
    if spec == "default":
        yield from default_documents()
        return
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        try:
            import datasets
        except ImportError:
            raise HeadscopeError("corpus 'hf:…' needs the `datasets` package (pip install datasets)") from None
        name, config, split = parts[0], (parts[1] or None) if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train"
        try:
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
        except Exception as e:
            raise HeadscopeError(f"cannot load dataset '{name}': {str(e).splitlines()[0]}") from None
        for row in ds:
            if row.get("text"):
                yield row["text"]
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise HeadscopeError(f"corpus path does not exist: {spec}")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".jsonl"))
    for f in files:
        if f.suffix == ".jsonl":
            for i, line in enumerate(_read_text(f, stats).splitlines()):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise HeadscopeError(f"{f}:{i + 1}: not valid JSON") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise HeadscopeError(f"{f}:{i + 1}: JSONL rows need a string field 'text'")
                yield row["text"]
        else:
            yield _read_text(f, stats)


def _tokenizer_key(model: Model) -> str:
    vocab = model.tokenizer.get_vocab()
    h = hashlib.sha1(json.dumps(sorted(vocab.items()))[:2_000_000].encode())
    h.update(str(model.bos_id).encode())
    return h.hexdigest()[:12]


def _spec_key(spec: str) -> str:
    if spec == "default":
        return f"default-v{CORPUS_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}"
    if spec.startswith("hf:"):
        return spec
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise HeadscopeError(f"corpus path does not exist: {spec}")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".jsonl"))
    # content, not (size, mtime): a file rewritten within the same second keeps neither apart
    return str(path) + "|" + "|".join(f"{f.relative_to(path) if f != path else f.name}:{file_hash(f)}" for f in files)


class TokenCorpus:
    """A tokenized, cached, split corpus for one tokenizer. ``batches`` yields [B, S] LongTensors."""

    def __init__(self, model: Model, spec: str = "default", seq_len: int = 128, holdout: float = 0.1,
                 max_docs: int | None = None, progress: bool = True):
        if seq_len < 2:
            raise HeadscopeError(f"sequence length must be at least 2, got {seq_len}")
        model.check_length(seq_len)
        self.spec, self.seq_len, self.holdout, self.bos = spec, seq_len, holdout, model.bos_id
        self.eos = model.tokenizer.eos_token_id if model.tokenizer.eos_token_id is not None else self.bos
        self._doc_ends: dict[str, np.ndarray] = {}
        key = hashlib.sha1(f"{_spec_key(spec)}|{_tokenizer_key(model)}|{holdout}|{max_docs}".encode()).hexdigest()[:16]
        self.dir = cache_dir() / "corpora" / key
        if not all((self.dir / f"{s}.npy").is_file() for s in SPLITS):
            self._build(model, max_docs, progress)
        self._streams = {s: np.load(self.dir / f"{s}.npy", mmap_mode="r") for s in SPLITS}
        if sum(len(s) for s in self._streams.values()) == 0:
            raise HeadscopeError(f"corpus '{spec}' contains no text")

    def _build(self, model: Model, max_docs, progress: bool) -> None:
        from tqdm import tqdm
        tok = model.tokenizer
        eos = tok.eos_token_id if tok.eos_token_id is not None else self.bos
        stats = _Replacements()
        self.dir.mkdir(parents=True, exist_ok=True)
        parts = {s: [] for s in SPLITS}
        docs = 0
        bar = tqdm(desc=f"tokenizing corpus '{self.spec}'", unit=" docs", disable=not progress, file=sys.stderr)
        for text in iter_documents(self.spec, stats):
            if not text.strip():
                continue
            h = int(hashlib.sha1(text.encode("utf-8", errors="replace")).hexdigest()[:8], 16) / 2 ** 32
            split = "heldout" if h < self.holdout else "train"
            ids = tok(text, add_special_tokens=False)["input_ids"]
            parts[split].append(np.asarray(ids + [eos], dtype=np.uint32))
            docs += 1
            bar.update(1)
            if max_docs and docs >= max_docs:
                break
        bar.close()
        if stats.count:
            print(f"headscope: warning: {stats.count} bytes of corpus '{self.spec}' were not UTF-8 and were "
                  "replaced by U+FFFD", file=sys.stderr)
        if docs == 0:
            raise HeadscopeError(f"corpus '{self.spec}' contains no text")
        for s in SPLITS:
            arr = np.concatenate(parts[s]) if parts[s] else np.zeros(0, dtype=np.uint32)
            import io
            buf = io.BytesIO()
            np.save(buf, arr)
            atomic_write_bytes(self.dir / f"{s}.npy", buf.getvalue())
        (self.dir / "info.json").write_text(json.dumps({"spec": self.spec, "docs": docs,
                                                        "tokens": {s: int(sum(len(p) for p in parts[s])) for s in SPLITS}}))

    def n_tokens(self, split: str = "train") -> int:
        """Tokens in the stream of ``split``."""
        return int(len(self._stream(split)))

    def n_sequences(self, split: str = "train") -> int:
        """Packed sequences of ``seq_len`` tokens available in ``split``."""
        return self.n_tokens(split) // (self.seq_len - 1)

    def _stream(self, split: str):
        if split not in SPLITS:
            raise HeadscopeError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
        return self._streams[split]

    def sequence(self, split: str, i: int) -> torch.Tensor:
        """Packed sequence ``i`` of ``split``, [S]."""
        n = self.seq_len - 1
        body = np.asarray(self._stream(split)[i * n:(i + 1) * n], dtype=np.int64)
        return torch.cat([torch.tensor([self.bos]), torch.from_numpy(body)])

    def batches(self, split: str = "train", batch_size: int = 8, max_tokens: int | None = None,
                start: int = 0) -> Iterator[torch.Tensor]:
        """Yield [B, S] batches of consecutive packed sequences from sequence ``start`` on, until
        ``max_tokens`` tokens (or the split) are used up. ``start`` lets a resumed job continue."""
        total = self.n_sequences(split)
        if total == 0:
            raise HeadscopeError(
                f"corpus '{self.spec}' is too small: its {split} split has {self.n_tokens(split)} tokens, fewer than "
                f"one sequence of {self.seq_len}; use a larger corpus or a smaller --seq-len")
        end = total if max_tokens is None else min(total, start + max(1, max_tokens // self.seq_len))
        for b in range(start, end, batch_size):
            yield torch.stack([self.sequence(split, i) for i in range(b, min(b + batch_size, end))])

    def document_of(self, split: str, offsets) -> np.ndarray:
        """Index of the document that holds each stream offset of ``split`` [n] (documents end with
        EOS in the stream; the EOS belongs to the document it ends)."""
        if split not in self._doc_ends:
            self._doc_ends[split] = np.flatnonzero(np.asarray(self._stream(split)) == self.eos)
        return np.searchsorted(self._doc_ends[split], np.asarray(offsets), side="left")

    def n_documents(self, split: str) -> int:
        """Documents in ``split``."""
        return int(self.document_of(split, [self.n_tokens(split) - 1])[0]) + 1 if self.n_tokens(split) else 0

    def window(self, split: str, offset: int) -> torch.Tensor:
        """``[BOS] + stream[offset : offset + S − 1]`` of ``split``, [S] (a packed sequence at any offset)."""
        n = self.seq_len - 1
        if offset < 0 or offset + n > self.n_tokens(split):
            raise HeadscopeError(f"window at {offset} runs past the {split} split ({self.n_tokens(split)} tokens)")
        body = np.asarray(self._stream(split)[offset:offset + n], dtype=np.int64)
        return torch.cat([torch.tensor([self.bos]), torch.from_numpy(body)])
