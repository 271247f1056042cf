"""The one-line head label (headscope.explain.head_label): it leads with the verdict, and it never says
"drives" or "promotes" without a passing test."""

from __future__ import annotations

import json

from headscope.explain.atlas_data import atlas_data
from headscope.explain.head_label import LabelOptions, head_facts, run_labels
from headscope.explain.results import LabelsResult
from headscope.runs import RunDir, read_json, write_json
from roles_helpers import INDUCTION_CONFIRMED, roles_doc


def _run(tmp_path, roles=True):
    write_json(tmp_path / "run.json", {"format_version": 1, "model": {"n_layers": 2, "n_heads": 3}})
    if roles:
        write_json(tmp_path / "heads" / "roles.json", roles_doc(heads={"1.2": {"induction": INDUCTION_CONFIRMED}}))
    # scores without a test: quoted only when no roles file exists
    write_json(tmp_path / "heads" / "scores.json", {"n_layers": 2, "n_heads": 3, "scores": {
        "induction": [[0.0, 0.1, 0.2], [0.3, 0.4, 0.89]]}})
    # a lens that is informative for 1.0 only, with its KL-term tokens; 0.1's gain is noise
    write_json(tmp_path / "lens" / "eval.json", {"df": 39, "per_head": {
        "1.0": {"gain": 0.49, "gain_se": 0.05, "informative": True},
        "0.1": {"gain": 0.05, "gain_se": 0.05, "informative": True}},      # saved flag wrong: recomputed
        "top_tokens": {"1.0": [["Ġdog", 0.2]], "0.1": [["Ġthe", 0.1]]}})
    # attribution (no test) for 0.0 and a non-significant ablation for 0.0; a significant one for 1.1
    write_json(tmp_path / "neurons" / "attribution.json", {
        "neurons": [{"layer": 1, "neuron": 5, "token": " sat"}],
        "pairs": [{"neuron": 0, "name": "0.0"}, {"neuron": 0, "name": "1.1"}]})
    write_json(tmp_path / "neurons" / "ablation.json", {"pairs": [
        {"neuron": 0, "name": "0.0", "effect": 0.2, "q": 0.3, "significant": False},
        {"neuron": 0, "name": "1.1", "effect": 0.1, "q": 0.01, "significant": True}]})
    return tmp_path


def test_label_leads_with_the_verdict(tmp_path):
    facts = head_facts(_run(tmp_path))
    assert facts["1.2"][0]["kind"] == "roles" and facts["1.2"][0]["text"].startswith("Induction head: attends")
    assert "0.41 [0.35, 0.47] nats/token" in facts["1.2"][0]["text"]
    assert all(fs[0]["kind"] == "roles" for fs in facts.values())
    assert facts["0.0"][0]["text"] == "No role confirmed among the 4 tested."
    assert not any(f["kind"] == "heads" for fs in facts.values() for f in fs)   # the verdict replaces raw scores


def test_label_never_claims_without_a_test(tmp_path):
    run = _run(tmp_path)
    facts = head_facts(run)
    blob = json.dumps(facts)
    assert "drives" not in blob and "promotes" not in blob
    assert len(facts["0.0"]) == 1                                  # attribution + failed ablation: nothing
    assert [f["kind"] for f in facts["1.1"]] == ["roles", "neurons"]
    assert "1.5 (→ ' sat') by 0.10, q = 0.01" in facts["1.1"][1]["text"]
    assert [f["kind"] for f in facts["1.0"]] == ["roles", "lens"] and "'Ġdog'" in facts["1.0"][1]["text"]
    assert [f["kind"] for f in facts["0.1"]] == ["roles"]          # lens not informative by BH
    res = run_labels(None, RunDir(run), LabelOptions(), progress=False)
    labels = read_json(run / "explain" / "labels.json")["heads"]
    assert isinstance(res, LabelsResult) and res.heads == 6 and labels["1.2"]["label"].startswith("Induction head:")
    assert atlas_data(run)["per_head"]["1.2"]["label"]["label"] == labels["1.2"]["label"]


def test_without_roles_scores_are_quoted_with_their_rank(tmp_path):
    facts = head_facts(_run(tmp_path, roles=False), top_frac=0.2)
    assert facts["1.2"][0]["text"] == "induction 0.89 (rank 1/6)" and facts["1.2"][0]["kind"] == "heads"
    assert "drives" not in json.dumps(facts)
