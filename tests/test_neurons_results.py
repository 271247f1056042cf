"""The neuron stages' typed results (headscope.neurons.results), called as a notebook user would
(``run.neurons.find()`` … ``run.neurons.ablate()``): each result holds what its artifact holds (counted
again here from the JSON files), the stage record keeps it whole, a reused stage returns the same typed
object, and the CLI's report prints from it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from headscope import open_run
from headscope.cli import main
from headscope.models.load import load_model
from headscope.neurons.results import (AblateResult, AblationVsRandom, AttributeResult, FindResult, MeanCI,
                                       MineResult, WilcoxonTest)
from headscope.testing.tiny import save_tiny_model

FIND = dict(per_layer=2, require_space=False, min_chars=1, last_k=2)
MINE = dict(seq_len=48, top_k=8, top_k_test=12, max_tokens=1200)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("llama_gqa", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def done(model_dir, tmp_path_factory):
    """Both neuron sets through find → mine → attribute → ablate from the Python API: (run, results by set)."""
    run = open_run(tmp_path_factory.mktemp("api") / "run", model=load_model(str(model_dir)), progress=False)
    res = {}
    for which in ("top", "random"):
        res[which] = {"find": run.neurons.find(which=which, **FIND), "mine": run.neurons.mine(which=which, **MINE),
                      "attribute": run.neurons.attribute(which=which, k_sigma=1.0),
                      "ablate": run.neurons.ablate(which=which, max_pairs=4)}
    return run, res


def _read(run, which, name):
    return json.loads((run.dir / ("neurons" if which == "top" else "neurons/random") / name).read_text())


@pytest.mark.parametrize("which", ["top", "random"])
def test_results_hold_what_the_artifacts_hold(done, which):
    run, res = done
    r = res[which]
    found = _read(run, which, "find.json")
    assert isinstance(r["find"], FindResult) and r["find"].which == which
    assert r["find"].neurons == len(found["neurons"]) == 4 and r["find"].per_layer == found["per_layer"]

    mined = _read(run, which, "mine.json")["neurons"]
    m = r["mine"]
    assert isinstance(m, MineResult) and m.neurons == len(mined)
    assert m.train_prompts == sum(len(n["train"]) for n in mined)
    assert m.test_prompts == sum(len(n["test"]) for n in mined)
    assert m.prompt_documents == {k: len({p["doc"] for n in mined for p in n[k]}) for k in ("train", "test")}
    lengths = [len(p["ids"]) for n in mined for p in n["train"] + n["test"]]
    assert m.mean_prompt_tokens == pytest.approx(np.mean(lengths))
    assert m.documents_scanned == _read(run, which, "mine.json")["documents_scanned"]

    att = _read(run, which, "attribution.json")
    a = r["attribute"]
    assert isinstance(a, AttributeResult) and a.pairs == len(att["pairs"]) > 0
    assert a.neurons_with_pairs == sum(1 for n in att["neurons"] if n["explain"])

    abl = _read(run, which, "ablation.json")
    b = r["ablate"]
    assert isinstance(b, AblateResult) and isinstance(b.effect, MeanCI) and isinstance(b.wilcoxon, WilcoxonTest)
    assert (b.pairs, b.neurons, b.significant_bh) == (len(abl["pairs"]), len(abl["per_neuron"]),
                                                      sum(p["significant"] for p in abl["pairs"]))
    effects = list(abl["per_neuron"].values())
    assert b.effect.n == len(effects) and b.effect.mean == pytest.approx(np.mean(effects))
    assert b.effect.to_json() == abl["summary"]["effect"] and b.wilcoxon.to_json() == abl["summary"]["wilcoxon"]


def test_vs_random_once_both_sets_are_ablated(done):
    run, res = done
    assert res["top"]["ablate"].vs_random is None            # the random set was not ablated yet
    vs = res["random"]["ablate"].vs_random
    assert isinstance(vs, AblationVsRandom) and isinstance(vs.difference.diff, float)
    assert vs.to_json() == json.loads((run.dir / "neurons/ablation_vs_random.json").read_text())
    assert vs.top.mean - vs.random.mean == pytest.approx(vs.difference.diff)


def test_record_keeps_the_result_and_a_reused_stage_returns_it(done):
    run, res = done
    for step in ("find", "mine", "attribute", "ablate"):
        rec = run.record(f"neurons.{step}")
        assert rec["result"] == res["random"][step].to_json()              # the last set run
    finished = run.record("neurons.ablate")["finished"]
    again = run.neurons.ablate(which="random", max_pairs=4)
    assert run.record("neurons.ablate")["finished"] == finished            # reused, not rerun
    assert again == res["random"]["ablate"] and isinstance(again.vs_random.top, MeanCI)


def test_an_old_untyped_record_reruns_the_stage(done):
    """A record written before the stage was typed (a summary, no result) is not fresh: the stage reruns and
    returns its typed result rather than the old dict."""
    run, res = done
    path = run.dir / "stages" / "neurons.attribute.json"
    rec = json.loads(path.read_text())
    rec.pop("result")
    path.write_text(json.dumps(rec))
    got = run.neurons.attribute(which="random", k_sigma=1.0)
    assert got == res["random"]["attribute"] and "result" in run.record("neurons.attribute")
    assert run.record("neurons.attribute")["why"].startswith("its record has no typed result")


def test_cli_reports_print_from_the_typed_results(done, model_dir, capsys):
    run, res = done
    base = ["--model", str(model_dir), "--out", str(run.path), "--quiet"]
    assert main(["neurons", "ablate", *base, "--set", "random", "--max-pairs", "4"]) == 0
    out = capsys.readouterr().out
    b = res["random"]["ablate"]
    assert f"{b.pairs} pairs over {b.neurons} neurons" in out and "random neurons: effect" in out
    assert main(["neurons", "attribute", *base, "--set", "random", "--k-sigma", "1"]) == 0
    assert f"which: random, pairs: {res['random']['attribute'].pairs}" in capsys.readouterr().out
