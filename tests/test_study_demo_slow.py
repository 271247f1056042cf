"""The demo on the real default model with the CI's small config (`headscope demo --small`): every stage
writes its artifacts, the atlas shows every instrument, and a second run reuses every stage."""

from __future__ import annotations

import json
import re

import pytest

from headscope.study import builtin_config, load_config, plan, run_study

pytestmark = pytest.mark.slow


def test_demo_small_writes_every_stage(default_model, demo_small_run):
    out, rec = demo_small_run
    steps = plan(load_config(builtin_config("ci")))
    ran = [s.name for s, _ in steps.steps]
    assert list(rec["stages"]) == ran + ["atlas"]
    for stage, opts in steps.steps:
        for art in stage.writes(opts):
            assert (out / art).exists(), f"stage {stage.name} did not write {art}"
        assert (out / "stages" / f"{stage.name}.json").is_file()
    # the artifacts the atlas reads, with their documented keys
    scores = json.loads((out / "heads" / "scores.json").read_text())
    assert len(scores["scores"]["induction"]) == 30 and len(scores["scores"]["induction"][0]) == 9
    assert (out / "lens" / "lenses.safetensors").is_file() and (out / "lens" / "eval.json").is_file()
    for f in ("cfg.json", "sae_weights.safetensors", "eval.json", "heads.json", "ioi.json", "dashboards/index.json"):
        assert (out / "sae" / "L18" / f).is_file(), f
    for f in ("find.json", "mine.json", "attribution.json", "ablation.json"):
        assert (out / "neurons" / f).is_file(), f
    assert (out / "explain" / "explanations_statistical.json").is_file() and (out / "explain" / "scores_statistical.json").is_file()
    # the atlas shows every instrument
    text = (out / "atlas" / "data" / "index.js").read_text()
    ix = json.loads(re.fullmatch(r'window\.__atlas_page\("index",(.*)\);\n', text, re.S).group(1))
    assert set(ix["sources"]) == {"heads", "lens", "sae", "neurons", "explain"}, (ix["sources"], ix["errors"])
    assert ix["errors"] == {} and len(ix["examples"]) == 2
    assert any(m["id"].startswith("lens.") for m in ix["measures"])
    assert any(c["key"] == "features_L18" and c["n"] > 0 for c in ix["collections"])
    study = json.loads((out / "study.json").read_text())
    assert study["model"]["spec"] == "default"

    # a second run reuses every finished stage
    before = {k: v["finished"] for k, v in study["stages"].items()}
    rec2 = run_study(load_config(builtin_config("ci")), out=out, model=default_model)
    assert {k: v["finished"] for k, v in rec2["stages"].items()} == before
