"""torchrun support shared by the trainers (lens, SAE): one small :class:`Distributed` dataclass.

Modelled on tuned-lens' ``Distributed``: the process reads torchrun's environment variables
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``); without them it is a
single process (rank 0 of 1) and every helper is a no-op. Data is split across ranks by taking every
``world_size``-th batch starting at ``rank`` (:meth:`Distributed.shard`); gradients are averaged with
:meth:`all_reduce_grads` (equivalent to DDP's all-reduce for parameters that are not module-wrapped,
which lets many heads' lenses live in one batched parameter tensor).

Backend: ``nccl`` when CUDA is used, else ``gloo`` (CPU; what the tests use).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass
class Distributed:
    """Process-group settings from torchrun's environment.

    rank: global rank of this process. local_rank: rank on this node (selects the CUDA device).
    world_size: number of processes. backend: ``gloo``/``nccl``; None picks from the device.
    """

    rank: int = field(default_factory=lambda: int(os.environ.get("RANK", "0")))
    local_rank: int = field(default_factory=lambda: int(os.environ.get("LOCAL_RANK", "0")))
    world_size: int = field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", "1")))
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def primary(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    def device(self, requested: str = "cpu") -> str:
        """The device this rank should use: ``cuda:<local_rank>`` when CUDA is requested under torchrun."""
        if requested.startswith("cuda") and self.enabled and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested

    def init(self, device: str = "cpu") -> "Distributed":
        """Initialise the default process group (no-op for a single process or when already done)."""
        if not self.enabled or dist.is_initialized():
            return self
        backend = self.backend or ("nccl" if str(device).startswith("cuda") else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group(backend=backend, rank=self.rank, world_size=self.world_size)
        return self

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled and dist.is_initialized():
            dist.barrier()

    def all_reduce(self, t: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """In-place all-reduce of ``t`` (``mean``, ``sum`` or ``max``); returns ``t``."""
        if not (self.enabled and dist.is_initialized()):
            return t
        if op == "max":
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            if op == "mean":
                t.div_(self.world_size)
        return t

    def all_reduce_grads(self, params: Iterable[torch.Tensor]) -> None:
        """Average the ``.grad`` of each parameter over ranks (what DDP does after backward)."""
        if not (self.enabled and dist.is_initialized()):
            return
        for p in params:
            if p.grad is not None:
                self.all_reduce(p.grad, "mean")

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy ``t`` from rank ``src`` to every rank (in place)."""
        if self.enabled and dist.is_initialized():
            dist.broadcast(t, src=src)
        return t

    def shard(self, items: Iterable[T]) -> Iterator[T]:
        """This rank's share of ``items``: every ``world_size``-th item starting at ``rank``."""
        for i, item in enumerate(items):
            if i % self.world_size == self.rank:
                yield item

    def destroy(self) -> None:
        """Tear the process group down (call at the end of a torchrun script)."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
