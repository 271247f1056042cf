"""The Python API (headscope.api), called as a notebook user would: ``open_run`` on a model they have,
``run.<instrument>.<step>(**options)`` for every stage and command of the registry through the stage
contract (fresh results reused, ``force`` reruns, changed options rerun), loaders, one-line errors, and the
examples/ scripts run as CI runs them."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import headscope
from headscope import HeadscopeError, open_run
from headscope import registry
from headscope.api import attr_name
from headscope.heads.results import HeadScoresResult
from headscope.runs import read_json
from headscope.testing.study import tiny_study
from headscope.testing.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
SCORE = dict(n_seqs=2, half_len=6, prefix_examples=2, prefix_lengths=[1, 2], batch_size=2)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("gpt2")


@pytest.fixture()
def run(tmp_path, tiny):
    return open_run(tmp_path / "run", model=tiny, progress=False)


def test_package_exports_the_api():
    assert headscope.open_run is open_run and "open_run" in headscope.__all__
    assert headscope.Run is headscope.api.Run


def test_every_stage_and_command_of_the_registry_is_a_method_with_its_options_as_keywords(run):
    for ins in registry.instruments():
        api = getattr(run, ins.name)
        for item, is_stage in [(s, True) for s in ins.stages] + [(c, False) for c in ins.commands]:
            step = getattr(api, attr_name(item.step))
            assert step.name == item.name
            params = inspect.signature(step).parameters
            fields = [f.name for f in dataclasses.fields(item.options)]
            assert list(params) == fields + (["force"] if is_stage else []), item.name
            assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())


def test_stage_is_reused_while_fresh_rerun_when_forced_or_options_change(run):
    res = run.heads.score(**SCORE)
    assert isinstance(res, HeadScoresResult)
    rec = run.record("heads.score")
    assert rec["why"] == "not run yet" and rec["options"]["n_seqs"] == 2
    again = run.heads.score(**SCORE)
    assert run.record("heads.score")["finished"] == rec["finished"], "fresh result reused, not recomputed"
    assert again == res, "a reused stage returns the same typed result"
    run.heads.score(**SCORE, force=True)
    assert run.record("heads.score")["why"] == "forced"
    run.heads.score(**{**SCORE, "n_seqs": 3})
    assert run.record("heads.score")["why"] == "options changed"


def test_heads_load_returns_the_scores_as_tensors_equal_to_the_json(run, tiny):
    res = run.heads.score(**SCORE)
    doc = read_json(run.path / "heads" / "scores.json")
    t = run.heads.load()
    assert t["induction"].shape == (tiny.n_layers, tiny.n_heads)
    assert t["prefix_induction"].shape == (2, tiny.n_layers, tiny.n_heads)
    for name in ("induction", "prev_token", "duplicate_token"):
        want = torch.tensor(doc["scores"][name], dtype=torch.float32)
        torch.testing.assert_close(t[name], want, atol=1e-5, rtol=0)
        # the result's top heads are the tensor's largest entries
        flat = t[name].flatten()
        top = flat.topk(len(res.top[name])).indices.tolist()
        assert [l * tiny.n_heads + h for l, h, _ in res.top[name]] == top
        assert [v for _, _, v in res.top[name]] == pytest.approx(flat[top].tolist(), abs=1e-5)
    assert res.layers == list(range(tiny.n_layers)) and res.prefix_lengths == [1, 2]


def test_the_same_run_from_the_python_api_and_a_study_shares_records(run, tmp_path):
    """A stage the API ran is fresh for a study with the same options (one contract, one record)."""
    run.heads.score(**SCORE)
    finished = run.record("heads.score")["finished"]
    cfg = {"heads": {"score": dict(SCORE)}}
    rec = run.study(cfg)
    assert run.record("heads.score")["finished"] == finished
    assert "heads.score" not in rec.get("stages", {})
    # a TOML file, as a user writes one: the study's own (tiny) options differ, so the stage reruns
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_study("heads.score"))
    rec = run.study(path)
    assert rec["stages"]["heads.score"]["why"] == "options changed"
    assert run.record("heads.score")["options"]["n_seqs"] == 4


@pytest.mark.parametrize("call,msg", [
    (lambda r: r.heads.score(n_seq=3), r"run.heads.score\(\): unknown option\(s\) n_seq; valid: layers, n_seqs"),
    (lambda r: r.heads.score(n_seqs="two"), r"n_seqs = 'two': expected int"),
    (lambda r: r.heads.score(n_seqs=0), r"--n-seqs must be at least 1"),
    (lambda r: r.lens.train(kind="cubic"), r"choose from 'affine', 'lowrank', 'full'"),
    (lambda r: r.sae.eval(), r"run.sae.eval\(\): missing option\(s\) name"),
    (lambda r: r.heads.score(3), r"takes its options as keywords"),
    (lambda r: r.lens.eval(), r"lens.eval needs .*lenses.json, which is missing: run `headscope lens train`"),
    (lambda r: r.lens.load(), r"no lenses in .*: run `run.lens.train\(\)` first"),
    (lambda r: r.sae.load("L9"), r"no SAE 'L9' in .*; SAEs here: none"),
    (lambda r: r.heads.load(), r"no head scores"),
    (lambda r: r.lens.show(prompt="hi", force=True), r"lens.show is a command"),
    (lambda r: r.study("no/such.toml"), r"study config not found"),
])
def test_bad_calls_are_one_line_errors_and_write_nothing(run, call, msg):
    before = sorted(p.relative_to(run.path) for p in run.path.rglob("*"))
    with pytest.raises(HeadscopeError, match=msg) as e:
        call(run)
    assert "\n" not in str(e.value)
    assert sorted(p.relative_to(run.path) for p in run.path.rglob("*")) == before


def test_unknown_step_names_the_steps(run):
    with pytest.raises(AttributeError, match="run.lens has no step 'trian'; it has train, eval"):
        run.lens.trian()


def test_open_run_refuses_a_run_of_another_model_and_a_file(tmp_path, tiny):
    open_run(tmp_path / "run", model=tiny)
    with pytest.raises(HeadscopeError, match="belongs to model"):
        open_run(tmp_path / "run", model=tiny_model("llama_gqa"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(HeadscopeError, match="is a file"):
        open_run(tmp_path / "f", model=tiny)
    with pytest.raises(HeadscopeError, match="not a headscope run directory"):
        open_run(tmp_path / "none", model=None)
    with pytest.raises(HeadscopeError, match="expected a spec string, a headscope Model or a transformers"):
        open_run(tmp_path / "x", model=3.5)


def test_open_run_takes_a_transformers_model_with_its_tokenizer(tmp_path, gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    run = open_run(tmp_path / "a", model=hf, tokenizer=tok, progress=False)
    run.heads.score(**SCORE)
    # the tokenizer saved beside the model is found from name_or_path
    run2 = open_run(tmp_path / "b", model=AutoModelForCausalLM.from_pretrained(gpt2_dir), progress=False)
    run2.heads.score(**SCORE)
    torch.testing.assert_close(run.heads.load()["induction"], run2.heads.load()["induction"])


def test_open_run_takes_an_nnsight_style_wrapper(tmp_path, gpt2_dir):
    """nnsight's LanguageModel holds the HF model as ``._model`` and its ``.tokenizer``: taken as it is."""
    import types

    from transformers import AutoModelForCausalLM, AutoTokenizer
    lm = types.SimpleNamespace(_model=AutoModelForCausalLM.from_pretrained(gpt2_dir),
                               tokenizer=AutoTokenizer.from_pretrained(gpt2_dir))
    run = open_run(tmp_path / "n", model=lm, progress=False)
    assert run.model.hf is lm._model and run.model.n_layers == lm._model.config.n_layer
    res = run.heads.score(**SCORE)
    assert res.n_layers == lm._model.config.n_layer


def test_an_existing_run_opens_without_a_model_for_loaders(run, tmp_path):
    run.heads.score(**SCORE)
    ro = open_run(run.path, model=None)
    assert set(ro.heads.load()) >= {"induction", "prev_token"}
    with pytest.raises(HeadscopeError, match="needs the model"):
        ro.heads.score(**SCORE)


def test_lens_and_sae_steps_return_loadable_objects(run, tiny):
    from headscope.lens.results import LensTrainResult
    from headscope.sae.results import SAETrainResult
    res = run.lens.train(layers=2, heads="0,1", tokens=256, init_tokens=256, batch_size=4)  # int layers as text
    assert isinstance(res, LensTrainResult) and res.sites == 2
    bank = run.lens.load()
    assert list(bank.sites) == [(2, 0), (2, 1)]
    res = run.sae.train(layer=1, name="L1", n_tokens=512, batch_size=64, buffer_tokens=256, expansion=1, k=2,
                        seq_len=32)
    assert isinstance(res, SAETrainResult) and (res.name, res.layer) == ("L1", 1)
    assert run.record("sae.train")["result"] == res.to_json()
    sae = run.sae.load("L1")
    assert sae.cfg.layer == 1 and sae.cfg.d_in == tiny.n_heads * tiny.d_head
    assert run.record("sae.train")["options"]["name"] == "L1"


def test_explain_steps_return_typed_results(tmp_path):
    """``run.explain.<step>()`` returns the step's typed result, which a reused (fresh) stage rebuilds equal
    from its record."""
    from headscope.explain.results import (ComparisonResult, ExplainRunResult, ExplainScoreResult, LabelsResult,
                                           PairScoresResult)
    m = tiny_model("llama_gqa")
    run = open_run(tmp_path / "run", model=m, progress=False)
    run.neurons.find(per_layer=2, require_space=False, min_chars=1, last_k=2)
    run.neurons.mine(seq_len=48, top_k=8, top_k_test=12, max_tokens=1200)
    run.neurons.attribute(k_sigma=1.0)
    ran = run.explain.run()
    assert isinstance(ran, ExplainRunResult) and ran.pairs == ran.new > 0 and ran.backend == "statistical"
    sc = run.explain.score(max_per_class=6, min_per_class=2)
    assert isinstance(sc, ExplainScoreResult) and sc.pairs == ran.pairs and sc.by_neuron["n"] >= 1
    assert run.record("explain.score")["result"] == sc.to_json()
    assert run.explain.score(max_per_class=6, min_per_class=2) == sc            # reused: the same result
    rows = read_json(run.path / "explain/scores_statistical.json")["pairs"]
    assert all(r["interval"] in ("wilson", "document") for r in rows if r["E"] is not None)
    ps = run.explain.score_pairs(min_per_class=2)
    assert isinstance(ps, PairScoresResult) and ps.detection["units"] >= 2
    base = run.explain.baseline(per_layer=2)
    assert isinstance(base, ComparisonResult) and base.unit == "neuron" and base.top["n"] >= 1
    assert isinstance(run.explain.label(), LabelsResult)


def test_examples_run(tmp_path):
    """Every examples/*.py script, on a tiny model (HEADSCOPE_EXAMPLE_TINY=1), as CI runs it."""
    scripts = sorted((ROOT / "examples").glob("*.py"))
    assert scripts
    env = {**os.environ, "HEADSCOPE_EXAMPLE_TINY": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for script in scripts:
        out = tmp_path / script.stem
        p = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, f"{script.name}: {p.stderr[-2000:]}"
        assert (out / "run.json").is_file()
        # a second run reuses every finished stage
        recs = {f.name: json.loads(f.read_text())["finished"] for f in (out / "stages").glob("*.json")}
        p = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        assert {f.name: json.loads(f.read_text())["finished"] for f in (out / "stages").glob("*.json")} == recs
