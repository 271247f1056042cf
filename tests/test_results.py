"""Typed stage results (headscope.results.Result): strict JSON, kept whole in the stage record, and a stage
reused while fresh returns the same typed object as one that just ran."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
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


@dataclass(frozen=True)
class WithOptional(Result):
    maybe: Inner | None = None


def test_optional_nested_result_is_rebuilt():
    for r in (WithOptional(Inner([1])), WithOptional(None)):
        back = WithOptional.from_json(r.to_json())
        assert back == r and (back.maybe is None or isinstance(back.maybe, Inner))


RETURNED: list = []


def dict_stage_fn(model, run, opts: Opts, progress=True):
    write_json(run / "out.json", {"n": opts.n})
    return RETURNED[-1]


DICT_STAGE = Stage("t.dict", Opts, f"{__name__}:dict_stage_fn", writes=lambda o: ["out.json"])
TYPED_STAGE = Stage("t.typed", Opts, f"{__name__}:dict_stage_fn", writes=lambda o: ["out.json"], result=Outcome)


@pytest.mark.parametrize("stage, value, msg", [
    (DICT_STAGE, {"n": 1, "x": torch.ones(2)}, r"stage t\.dict: summary\.x: Tensor is not a JSON value"),
    (DICT_STAGE, {"stats": {"mean": math.nan}}, r"stage t\.dict: summary\.stats\.mean: nan is not finite"),
    (DICT_STAGE, {"n": np.int64(3)}, r"stage t\.dict: summary\.n: int64 is not a JSON value"),
    (DICT_STAGE, {"path": Path("/tmp")}, r"stage t\.dict: summary\.path: \w*Path is not a JSON value"),
    (DICT_STAGE, {"per_layer": {1: 2}}, r"stage t\.dict: summary\.per_layer: key 1 is not a string"),
    (DICT_STAGE, [1, 2], r"stage t\.dict returned a list, not a Result or a dict"),
    (TYPED_STAGE, Outcome(mean=math.inf), r"stage t\.typed: Outcome\.mean: inf is not finite"),
    (TYPED_STAGE, Outcome(by_head={"0.1": [torch.zeros(1)]}), r"stage t\.typed: Outcome\.by_head\.0\.1\[0\]: Tensor"),
    (TYPED_STAGE, {"mean": 0.5}, r"stage t\.typed returned a dict, not its declared Outcome"),
])
def test_a_summary_value_that_is_not_json_is_an_error_not_dropped(tmp_path, stage, value, msg):
    """Issue 22: a stage's summary used to pass through a filter that silently left out non-JSON values; now
    it is a one-line error naming the stage and the field, and the stage leaves no record and no output."""
    RETURNED.append(value)
    run = RunDir(tmp_path / "run", tiny_model("gpt2").identity())
    with pytest.raises(HeadscopeError, match=msg) as e:
        run_stage(None, run, stage, Opts(2))
    assert "\n" not in str(e.value)
    assert run.record(stage.name) is None and not (run / "out.json").exists()


def test_a_json_summary_is_kept_compact_and_reused(tmp_path):
    """A dict summary of JSON values is kept as it is (ints, floats, None, nested), but for values whose JSON
    text is long (the record stays small); a reused stage returns what the record kept."""
    RETURNED.append({"n": 2, "mean": 0.25, "none": None, "nested": {"a": [1, 2.5]}, "long": list(range(3000)),
                     "inner": Inner([3])})
    run = RunDir(tmp_path / "run", tiny_model("gpt2").identity())
    first, ran = run_stage(None, run, DICT_STAGE, Opts(2))
    assert ran and first is RETURNED[-1]
    kept = {"n": 2, "mean": 0.25, "none": None, "nested": {"a": [1, 2.5]}, "inner": {"values": [3]}}
    assert run.record("t.dict")["summary"] == kept and "result" not in run.record("t.dict")
    again, ran = run_stage(None, run, DICT_STAGE, Opts(2))
    assert not ran and again == kept
