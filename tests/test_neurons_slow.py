"""The whole head → neuron pipeline offline on the embedded default model (SmolLM2-135M) with the
statistical explainer: find, mine, attribute, explain, score, random baseline, comparison, ablation,
atlas — every stage runs (no silent skip), and the controls sit where "no effect" puts them."""

import json

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    from headscope.models.load import load_model
    return load_model("default")


def test_default_model_pipeline_offline(model, tmp_path):
    from headscope.explain import atlas_data as explain_atlas
    from headscope.explain.options import BaselineOptions, RunOptions, ScoreOptions
    from headscope.explain import stages as ex
    from headscope.neurons import atlas_data as neuron_atlas
    from headscope.neurons import congruence
    from headscope.neurons import stages as ns
    from headscope.neurons.options import AblateOptions, AttributeOptions, FindOptions, MineOptions
    from headscope.runs import RunDir, read_tensors

    run = RunDir(tmp_path / "run", model.identity())
    res = ns.run_find(model, run, FindOptions(last_k=2, per_layer=3))
    assert res["neurons"] == 6
    found = json.loads((run / "neurons/find.json").read_text())["neurons"]
    for n in found:                                      # the reference filters hold on a real vocabulary
        assert n["token"].startswith(" ") and len(n["token"].strip()) >= 3
    lc = congruence.layer_congruence(model, 29)
    top = max((n for n in found if n["layer"] == 29), key=lambda n: n["dot"])
    assert top["dot"] == pytest.approx(float(lc.dot[top["neuron"]]), rel=1e-5)
    mined = ns.run_mine(model, run, MineOptions(top_k=10, top_k_test=24, max_tokens=8000), progress=False)
    assert mined["train_prompts"] >= 48 and mined["test_prompts"] >= 100
    att = ns.run_attribute(model, run, AttributeOptions(), progress=False)
    A = read_tensors(run / "neurons/attribution.safetensors")["A"]
    assert A.shape[2] == 30 * 9
    assert not torch.isnan(A[0, 0, : (found[0]["layer"] + 1) * 9]).any()          # sequential: same layer eligible
    assert att["pairs"] > 0, "no 25–75% head on this sample: the settings above must give pairs"
    ex.run_explain(model, run, RunOptions(), progress=False)
    summary = ex.run_score(model, run, ScoreOptions(max_per_class=12, min_per_class=4), progress=False)
    assert summary.pairs == att["pairs"] and summary.scored > 0
    abl = ns.run_ablate(model, run, AblateOptions(max_pairs=6), progress=False)
    assert abl["pairs"] == min(6, att["pairs"])
    assert abl["effect"]["n"] == abl["neurons"] and abl["wilcoxon"]["n"] == abl["neurons"]
    comp = ex.run_random_baseline(model, run, BaselineOptions(per_layer=3), progress=False)
    rows = json.loads((run / "explain/scores_statistical.json").read_text())["pairs"]
    assert comp.top["n"] == len({r["neuron"] for r in rows if r["E"] is not None})
    # the negative control: explanations of another neuron's pairs score at chance
    ctrl = summary.control["by_neuron"]
    assert abs(ctrl["mean"] - 0.5) < 0.1
    vs = comp.ablation_vs_random                     # the random set was ablated alike and compared
    assert vs["unit"] == "neuron" and vs["top"]["n"] == abl["neurons"]
    nd, ed = neuron_atlas.atlas_data(run.path), explain_atlas.atlas_data(run.path)
    json.dumps([nd, ed], allow_nan=False)
    assert len(nd["neurons"]) == 6 and ed["per_head"]
