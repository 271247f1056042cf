"""Activation store: z of one or more layers, streamed from the model or cached on disk in shards.

The store hands out activations in **blocks**: block i is a fixed set of token rows ([N_i, d_in]),
either the z of a fixed set of corpus sequences (model streaming, drawn by the shared sampler) or shard i of a disk cache.
:class:`ShuffledBatches` shuffles inside a block with a generator seeded by (seed, block), so the
batch at any training step is a pure function of (seed, step): exact resume only needs the step, and
memory is bounded by the block size (``buffer_tokens``), not by the corpus size.

The BOS position is left out: every packed sequence starts with BOS, and z there is the same constant
vector in every sequence (position 0 attends only to itself), so it carries no information and, being
an outlier, would dominate the reconstruction loss. Evaluation keeps z at position 0 exact for the same
reason.

Disk cache layout (``cache_activations``)::

    CACHE/manifest.json            {"layers": [...], "d_in": …, "shards": n_complete, "tokens_per_shard": …,
                                    "model": identity, "seq_len": …, "corpus": …, "sequences_per_shard": …}
    CACHE/L{layer}/shard_00000.safetensors   key "z" [tokens, d_in] (float32 or the requested dtype)

A shard is written to a temporary file and renamed; the manifest counts only complete shards and is
rewritten after each one, so a full disk or an interrupt never leaves a corrupt shard counted.
"""

from __future__ import annotations

import errno
import math
import sys
from pathlib import Path
from typing import Iterator

import torch

from ..capture import capture
from ..data import TokenCorpus
from ..errors import HeadscopeError
from ..models.load import Model
from ..runs import read_json, read_tensors, write_json, write_tensors
from ..sampling import Windows


def z_rows(model: Model, ids: torch.Tensor, layers: list[int], drop_bos: bool = True) -> dict[int, torch.Tensor]:
    """z of ``layers`` for token ids [B, S], flattened to rows [B·(S−1), H·Dh] (float32, CPU)."""
    cap = capture(model, ids, layers=layers, what=("z",), stop_after=max(layers))
    out = {}
    for layer in layers:
        z = cap["z"][layer]
        if drop_bos:
            z = z[:, 1:]
        out[layer] = z.reshape(-1, model.n_heads * model.d_head).float().cpu()
    return out


class ModelSource:
    """Blocks of z streamed from the model: block i = plan entries [i·n, (i+1)·n) of the shared sampler
    over the train split (:class:`headscope.sampling.Windows`, seeded: the split's sequences in a random
    order, so every block spreads over the documents; n = ``buffer_tokens // seq_len``), wrapping around
    the split when training runs more than one epoch."""

    def __init__(self, model: Model, corpus: TokenCorpus, layers: list[int], buffer_tokens: int = 32768,
                 batch_size: int = 16, split: str = "train", seed: int = 0):
        self.model, self.corpus, self.layers, self.split = model, corpus, list(layers), split
        self.d_in = model.n_heads * model.d_head
        self.seqs_per_block = max(1, buffer_tokens // corpus.seq_len)
        total = corpus.n_sequences(split)
        if total == 0:
            raise HeadscopeError(f"corpus '{corpus.spec}' has no {split} sequences of {corpus.seq_len} tokens")
        self.plan = Windows(corpus, split, seed)
        self.seqs_per_block = min(self.seqs_per_block, total)
        self.n_blocks = total // self.seqs_per_block
        self.batch_size = batch_size
        self.rows_per_block = self.seqs_per_block * (corpus.seq_len - 1)

    def n_documents(self, n_blocks: int) -> int:
        """Distinct documents the first ``n_blocks`` blocks (wrapping) draw from."""
        n = min(n_blocks, self.n_blocks) * self.seqs_per_block
        return self.plan.n_documents(n)

    def block(self, i: int) -> dict[int, torch.Tensor]:
        """z rows of block ``i`` (mod the number of blocks) per layer, [rows_per_block, d_in]."""
        j = i % self.n_blocks
        start = j * self.seqs_per_block
        parts: dict[int, list[torch.Tensor]] = {l: [] for l in self.layers}
        for ids, _ in self.plan.batches(self.batch_size, self.seqs_per_block, start):
            for l, z in z_rows(self.model, ids, self.layers).items():
                parts[l].append(z)
        return {l: torch.cat(p) for l, p in parts.items()}


class CacheSource:
    """Blocks read from a disk cache written by :func:`cache_activations`: block i = shard i (mod n)."""

    def __init__(self, path: str | Path, layers: list[int], model: Model | None = None):
        self.path = Path(path)
        man = self.path / "manifest.json"
        if not self.path.is_dir():
            raise HeadscopeError(f"activation cache folder does not exist: {self.path}")
        if not man.is_file():
            raise HeadscopeError(f"activation cache {self.path} is empty (no manifest.json): run `headscope sae cache` first")
        self.manifest = read_json(man)
        if model is not None and self.manifest.get("model"):
            model.check_identity(self.manifest["model"], what=f"activation cache {self.path}")
        self.n_blocks = int(self.manifest.get("shards", 0))
        if self.n_blocks == 0:
            raise HeadscopeError(f"activation cache {self.path} holds no complete shard")
        missing = [l for l in layers if l not in self.manifest.get("layers", [])]
        if missing:
            raise HeadscopeError(f"activation cache {self.path} has layers {self.manifest.get('layers')}, not {missing}")
        self.layers = list(layers)
        self.d_in = int(self.manifest["d_in"])
        self.rows_per_block = int(self.manifest["tokens_per_shard"])

    def block(self, i: int) -> dict[int, torch.Tensor]:
        j = i % self.n_blocks
        out = {}
        for l in self.layers:
            t = read_tensors(self.path / f"L{l}" / f"shard_{j:05d}.safetensors")
            if "z" not in t or t["z"].dim() != 2 or t["z"].shape[1] != self.d_in:
                raise HeadscopeError(f"activation cache shard L{l}/shard_{j:05d} is malformed")
            out[l] = t["z"].float()
        return out


class MemorySource:
    """Blocks from an in-memory tensor of z rows [N, d_in] (e.g. for benchmarks): block i = rows
    [i·n, (i+1)·n) with n = ``rows_per_block``."""

    def __init__(self, rows: torch.Tensor, layer: int, rows_per_block: int = 65536):
        if rows.dim() != 2 or rows.shape[0] == 0:
            raise HeadscopeError(f"activation rows must be a non-empty [N, d_in] tensor, got {tuple(rows.shape)}")
        self.rows, self.layers, self.d_in = rows, [layer], rows.shape[1]
        self.rows_per_block = min(rows_per_block, rows.shape[0])
        self.n_blocks = rows.shape[0] // self.rows_per_block

    def block(self, i: int) -> dict[int, torch.Tensor]:
        j = i % self.n_blocks
        return {self.layers[0]: self.rows[j * self.rows_per_block:(j + 1) * self.rows_per_block]}


def cache_activations(model: Model, corpus: TokenCorpus, layers: list[int], path: str | Path,
                      max_tokens: int | None = None, shard_tokens: int = 32768, batch_size: int = 16,
                      dtype: torch.dtype = torch.float32, progress: bool = True) -> dict:
    """Run the model once over the train split and write z of every layer in ``layers`` to shards.

    Resumes: complete shards listed in the manifest are kept. Returns the manifest.
    """
    from tqdm import tqdm
    path = Path(path)
    src = ModelSource(model, corpus, layers, buffer_tokens=shard_tokens, batch_size=batch_size)
    n_total = src.n_blocks if max_tokens is None else min(src.n_blocks, max(1, math.ceil(max_tokens / src.rows_per_block)))
    base = {"layers": sorted(layers), "d_in": src.d_in, "tokens_per_shard": src.rows_per_block,
            "sequences_per_shard": src.seqs_per_block, "seq_len": corpus.seq_len, "corpus": corpus.spec,
            "model": model.identity(), "dtype": str(dtype).replace("torch.", ""),
            "sampler": "headscope.sampling.Windows(seed=0)"}   # caches of the old first-N order are not reused
    done = 0
    if (path / "manifest.json").is_file():
        old = read_json(path / "manifest.json")
        same = {k: old.get(k) for k in base} == base
        if not same:
            raise HeadscopeError(f"activation cache {path} was made with other settings (layers, model, corpus or "
                                 "shard size); use another folder")
        done = int(old.get("shards", 0))
    bar = tqdm(total=n_total, initial=min(done, n_total), desc="caching z", unit=" shard", file=sys.stderr,
               disable=not progress)
    for i in range(done, n_total):
        zs = src.block(i)
        for l, z in zs.items():
            if not torch.isfinite(z).all():
                raise HeadscopeError(f"non-finite z at layer {l} in shard {i} (model produced NaN/inf)")
            try:
                write_tensors(path / f"L{l}" / f"shard_{i:05d}.safetensors", {"z": z.to(dtype)})
            except Exception as e:  # safetensors reports I/O failures as its own error type
                if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
                    raise HeadscopeError(f"disk full while writing activation shard {i} to {path}: {i} complete "
                                         "shards kept; free space and run again to resume") from None
                raise HeadscopeError(f"cannot write activation shard {i} to {path}: {e}") from None
        write_json(path / "manifest.json", {**base, "shards": i + 1})
        bar.update(1)
    bar.close()
    if n_total == 0:
        raise HeadscopeError("no activation shard to cache (corpus too small)")
    return read_json(path / "manifest.json")


class ShuffledBatches:
    """Deterministic shuffled batches over the blocks of a source.

    Global step s of ``world_size`` ranks: rank r reads block ``(s // bpb) · world_size + r`` and, inside
    it, the ``s % bpb``-th slice of a permutation seeded by (seed, block); bpb = batches per block.
    """

    def __init__(self, source, layer: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.source, self.layer, self.batch_size = source, layer, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.bpb = source.rows_per_block // batch_size
        if self.bpb == 0:
            raise HeadscopeError(f"batch size {batch_size} exceeds the {source.rows_per_block} tokens of one buffer "
                                 "block; raise --buffer-tokens or lower --batch-size")
        self._cache: tuple[int, torch.Tensor] | None = None

    def _block(self, b: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != b:
            rows = self.source.block(b)[self.layer]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
            self._cache = (b, rows[torch.randperm(rows.shape[0], generator=g)])
        return self._cache[1]

    def batch(self, step: int) -> torch.Tensor:
        """The [batch_size, d_in] batch of this rank at global step ``step``."""
        b = (step // self.bpb) * self.world_size + self.rank
        o = step % self.bpb
        return self._block(b)[o * self.batch_size:(o + 1) * self.batch_size]

    def block_rows(self, step: int) -> torch.Tensor:
        """All rows of this rank's block at ``step`` (used for resampling dead features)."""
        return self._block((step // self.bpb) * self.world_size + self.rank)

    def iterate(self, start: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
        for s in range(start, stop):
            yield s, self.batch(s)
