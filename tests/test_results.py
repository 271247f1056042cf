"""Typed stage results (headscope.results.Result): strict JSON, kept whole in the stage record, and a stage
reused while fresh returns the same typed object as one that just ran."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from headscope.errors import HeadscopeError
from headscope.results import Result
from headscope.runs import RunDir, Stage, run_stage, write_json
from headscope.testing.tiny import tiny_model

CALLS: list[int] = []


@dataclass(frozen=True)
class Inner(Result):
    values: list = field(default_factory=list)


@dataclass(frozen=True)
class Outcome(Result):
    count: int = 0
    mean: float | None = None
    inner: Inner = field(default_factory=Inner)
    by_head: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Opts:
    n: int = 3


def stage_fn(model, run, opts: Opts, progress=True):
    CALLS.append(opts.n)
    write_json(run / "out.json", {"n": opts.n})
    return Outcome(count=opts.n, mean=opts.n / 2, inner=Inner(list(range(opts.n))),
                   by_head={"0.1": [1.5, None], "long": list(range(3000))})


STAGE = Stage("t.typed", Opts, f"{__name__}:stage_fn", writes=lambda o: ["out.json"], result=Outcome)


def test_result_round_trips_and_rejects_non_json():
    r = Outcome(count=2, mean=1.0, inner=Inner([1, 2]), by_head={"a": [1.0, None]})
    assert Outcome.from_json(r.to_json()) == r
    with pytest.raises(HeadscopeError, match="not finite"):
        Outcome(mean=math.nan).to_json()
    with pytest.raises(HeadscopeError, match="Tensor is not a JSON value"):
        Outcome(by_head={"x": torch.ones(2)}).to_json()
    with pytest.raises(HeadscopeError, match="not a string"):
        Outcome(by_head={1: 2}).to_json()


def test_reused_stage_returns_the_same_typed_result(tmp_path):
    CALLS.clear()
    run = RunDir(tmp_path / "run", tiny_model("gpt2").identity())
    first, ran = run_stage(None, run, STAGE, Opts(4))
    assert ran and isinstance(first, Outcome)
    again, ran = run_stage(None, run, STAGE, Opts(4))
    assert not ran and CALLS == [4]
    assert isinstance(again, Outcome) and again == first   # long fields kept whole, nested result rebuilt
    assert isinstance(again.inner, Inner) and len(again.by_head["long"]) == 3000
