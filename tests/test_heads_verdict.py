"""The verdict of a head (headscope.heads.verdict) from hand-written roles documents: confirmed roles worded
with their numbers, shown-only roles marked untested causally, nothing confirmed said so, and never a
claim from a failed test."""

from __future__ import annotations

import copy
import json
import re

import pytest

from headscope.errors import HeadscopeError
from headscope.heads.verdict import check_roles, load_roles, run_findings, run_verdicts, verdict
from headscope.runs import write_json
from roles_helpers import INDUCTION_CONFIRMED, roles_doc


def test_confirmed_role_worded_with_score_control_and_effect():
    doc = roles_doc(heads={"1.2": {"induction": INDUCTION_CONFIRMED}})
    v = verdict("1.2", doc)
    assert v.confirmed == ("induction",) and v.n_tested == 4
    assert v.text == ("Induction head: attends to the token after the previous occurrence of the current token "
                      "(induction score 0.89 vs 0.01 under uniform causal attention); ablating it raises the loss "
                      "on the second copy of repeated text by 0.41 [0.35, 0.47] nats/token.")
    assert v.rows[0]["role"] == "induction" and v.rows[0]["confirmed"] and v.rows[0]["effect"] == 0.41
    assert ("Induction head", "role-induction") in v.links


def test_numbers_come_from_the_document():
    doc = roles_doc(heads={"0.1": {"induction": {"score": 0.734, "control": 0.0213, "effect": 1.234,
                                                 "effect_ci": [1.01, 1.5]}}})
    v = verdict("0.1", doc)
    assert "0.73 vs 0.021" in v.text and "by 1.23 [1.01, 1.50] nats/token" in v.text


def test_negative_expected_sign_keeps_its_sign():
    doc = roles_doc(heads={"0.0": {"copying": {"score": 0.6, "control": 0.02, "effect": -0.8,
                                               "effect_ci": [-1.1, -0.5]}}})
    v = verdict("0.0", doc)
    assert "ablating it changes the logit of the attended token by -0.80 [-1.10, -0.50]" in v.text


def test_local_head_names_its_offset():
    doc = roles_doc(heads={"0.0": {"induction": INDUCTION_CONFIRMED}})
    doc["roles"]["local"] = {**doc["roles"]["sink"], "title": "Local (fixed-offset) head",
                             "phrase": "attends to the token a fixed number of positions back"}
    doc["roles"]["local"]["passed"] = [[True, False, False], [False, False, False]]
    doc["heads"]["0.0"].update(shown=["induction", "local"], offset=2)
    v = verdict("0.0", doc)
    assert "Also" not in v.text and v.shown == ("local",)
    doc["heads"]["0.0"]["confirmed"] = []
    doc["roles"]["induction"]["confirmed"][0][0] = False
    assert "local (fixed-offset) head (offset 2) (attention to position 0" in verdict("0.0", doc).text


def test_two_confirmed_roles_strongest_first_in_two_sentences():
    doc = roles_doc(heads={"1.0": {"induction": {**INDUCTION_CONFIRMED, "effect": 0.2, "effect_ci": [0.1, 0.3]},
                                   "copying": {"score": 0.5, "effect": -0.9, "effect_ci": [-1.2, -0.6]}}})
    v = verdict("1.0", doc)
    assert v.confirmed == ("copying", "induction")
    assert v.text.startswith("Copying head: raises the logit")
    assert "Also confirmed: induction head (induction score 0.89" in v.text
    assert len(re.findall(r"\.\s", v.text + " ")) == 2  # two sentences


def test_nothing_shown_says_no_role_confirmed_among_n():
    v = verdict("0.0", roles_doc())
    assert v.text == "No role confirmed among the 4 tested." and v.confirmed == () and v.shown == ()


def test_shown_only_roles_marked_untested_causally():
    doc = roles_doc(heads={"0.2": {"sink": {"score": 0.93, "control": 0.05},            # causal: null
                                   "induction": {"score": 0.3}}})                       # not ablated
    v = verdict("0.2", doc)
    assert v.text.startswith("No role confirmed among the 4 tested. Shown by score only:")
    assert "attention sink (attention to position 0 0.93 vs 0.05 under uniform causal attention; no causal " \
           "test for this role: untested causally)" in v.text
    assert "induction head (induction score 0.30 vs 0.01 under uniform causal attention; not ablated: " \
           "untested causally)" in v.text
    assert v.confirmed == () and set(v.shown) == {"sink", "induction"}
    assert "ablating it raises" not in v.text


def test_failed_causal_test_is_never_a_claim():
    doc = roles_doc(heads={"1.1": {"induction": {"score": 0.8, "effect": 0.01, "effect_ci": [-0.02, 0.04],
                                                 "effect_q": 0.6, "causal_passed": False}}})
    v = verdict("1.1", doc)
    assert v.confirmed == () and v.text.startswith("No role confirmed among the 4 tested.")
    assert "ablation effect 0.01 [-0.02, 0.04] on the second copy of repeated random-token sequences: not " \
           "significant" in v.text
    assert "raises" not in v.text


def test_failed_score_test_never_shown_even_with_causal_effect():
    doc = roles_doc(heads={"1.1": {"induction": {"score": 0.05, "passed": False, "effect": 0.3,
                                                 "effect_ci": [0.2, 0.4]}}})
    v = verdict("1.1", doc)
    assert v.text == "No role confirmed among the 4 tested." and not v.rows[-1]["confirmed"]


def test_stage_list_not_trusted_over_the_grids():
    """A head listed as confirmed whose grids say the causal test failed is not confirmed."""
    doc = roles_doc(heads={"1.1": {"induction": {"score": 0.8, "effect": 0.01, "effect_ci": [-0.02, 0.04],
                                                 "causal_passed": False}}})
    doc["heads"]["1.1"]["confirmed"] = ["induction"]
    assert verdict("1.1", doc).confirmed == ()


def test_mixed_confirmed_and_shown():
    doc = roles_doc(heads={"1.0": {"induction": INDUCTION_CONFIRMED, "sink": {"score": 0.6}}})
    v = verdict("1.0", doc)
    assert v.confirmed == ("induction",) and v.shown == ("sink",)
    assert v.text.startswith("Induction head:") and "sink" not in v.roles_sentence.lower()
    assert [r["role"] for r in v.rows[:2]] == ["induction", "sink"]


def test_findings_follow_the_roles():
    doc = roles_doc()
    v = verdict("0.0", doc, [{"kind": "lens", "text": "Its lens is informative: 0.50 bits/token", "anchor": "src-lens"}])
    assert v.text == "No role confirmed among the 4 tested. Its lens is informative: 0.50 bits/token."
    assert ("lens", "src-lens") in v.links
    assert verdict("0.0", None).text.startswith("Roles not measured in this run")


@pytest.mark.parametrize("breaker, msg", [
    (lambda d: d.pop("heads"), "lacks 'heads'"),
    (lambda d: d["roles"]["induction"].pop("control"), "role 'induction' lacks control"),
    (lambda d: d["roles"]["induction"]["causal"].pop("effect_phrase"), "causal test lacks effect_phrase"),
    (lambda d: d["roles"]["induction"]["score"].pop(), "score not a [2][3] grid"),
    (lambda d: d["heads"]["0.0"]["shown"].append("nope"), "unknown role(s) nope"),
])
def test_bad_roles_file_is_one_line_error(breaker, msg):
    doc = roles_doc()
    breaker(doc)
    with pytest.raises(HeadscopeError, match=re.escape(msg)):
        check_roles(doc)


def _run(tmp_path, doc=None):
    write_json(tmp_path / "run.json", {"format_version": 1, "model": {"n_layers": 2, "n_heads": 3}})
    if doc is not None:
        write_json(tmp_path / "heads" / "roles.json", doc)
    return tmp_path


def test_run_findings_only_where_tests_passed(tmp_path):
    run = _run(tmp_path, roles_doc(heads={"1.2": {"induction": INDUCTION_CONFIRMED}}))
    # lens: 1.0 clearly informative, 0.1 not (gain within noise); tokens listed in KL-term order
    write_json(run / "lens" / "eval.json", {
        "df": 39, "q": 0.05,
        "per_head": {"1.0": {"gain": 0.5, "gain_se": 0.05}, "0.1": {"gain": 0.02, "gain_se": 0.05}},
        "top_tokens": {"1.0": [["ĠParis", 0.3], ["ĠFrance", 0.2]], "0.1": [["the", 0.1]]}})
    # neurons: one significant pair on 0.2, one not on 1.1
    write_json(run / "neurons" / "ablation.json", {"pairs": [
        {"neuron": 0, "layer": 1, "head": 2, "name": "0.2", "effect": 0.12, "q": 0.01, "significant": True},
        {"neuron": 0, "layer": 1, "head": 1, "name": "1.1", "effect": 0.30, "q": 0.4, "significant": False}]})
    write_json(run / "neurons" / "attribution.json", {"neurons": [{"layer": 1, "neuron": 7, "token": " cat"}],
                                                      "pairs": [{"neuron": 0, "name": "1.1"}]})
    write_json(run / "sae" / "L1" / "cfg.json", {"metadata": {"headscope": {"layer": 1}}})
    write_json(run / "sae" / "L1" / "heads.json", {"heads": {
        "0": {"polysemantic": True, "q_poly": 0.01, "n_groups": 3},
        "1": {"polysemantic": False, "q_poly": 0.5, "n_groups": 1}}})
    # look-ups: a significant pair on 0.2, a non-significant one on 1.1
    write_json(run / "explain" / "explanations_statistical.json", {"pairs": [
        {"neuron": 0, "name": "0.2", "explanation": "the prompt ends with a noun\nmore"},
        {"neuron": 0, "name": "1.1", "explanation": "anything"}]})
    write_json(run / "explain" / "scores_statistical.json", {"pairs": [
        {"neuron": 0, "name": "0.2", "neuron_layer": 1, "neuron_index": 7, "token": " cat", "E": 0.8, "E_low": 0.7,
         "E_high": 0.88, "q": 0.004, "significant": True, "E_control": 0.5},
        {"neuron": 0, "name": "1.1", "neuron_layer": 1, "neuron_index": 7, "token": " cat", "E": 0.6, "q": 0.3,
         "significant": False},
        {"neuron": 1, "name": "0.2", "neuron_layer": 1, "neuron_index": 9, "token": " dog", "E": 0.9, "E_low": 0.8,
         "E_high": 0.95, "q": 0.01, "significant": True, "interval": "document", "documents": 6}]})
    f = run_findings(run)
    assert set(f) == {"1.0", "0.2"}
    assert [x["kind"] for x in f["0.2"]] == ["neurons", "lookup", "lookup"]
    assert "“the prompt ends with a noun” — E = 0.80 [0.70, 0.88] on held-out prompts, shuffled explanation " \
           "0.50 (binomial vs chance, BH q = 0.004)" in f["0.2"][1]["text"]
    assert "(sign-flip test over 6 documents vs chance, BH q = 0.01)" in f["0.2"][2]["text"]   # clustered by document
    assert [x["kind"] for x in f["1.0"]] == ["lens", "sae"]
    assert "'ĠParis', 'ĠFrance'" in f["1.0"][0]["text"] and "KL(lens ‖ null)" in f["1.0"][0]["text"]
    assert "1.7 (→ ' cat') by 0.12, q = 0.01" in f["0.2"][0]["text"]
    vs = run_verdicts(run)
    assert len(vs) == 6 and vs["1.2"].confirmed == ("induction",)
    assert vs["1.0"].text.startswith("No role confirmed among the 4 tested. Its lens is informative")
    blob = json.dumps({k: v.to_json() for k, v in vs.items()})
    assert "drives" not in blob and "promotes" not in blob
    assert "1.1" not in f  # the failed ablation is no finding


def test_load_roles_absent_and_shape_mismatch(tmp_path):
    assert load_roles(_run(tmp_path)) is None
    write_json(tmp_path / "heads" / "roles.json", roles_doc(n_layers=3))
    with pytest.raises(HeadscopeError, match="is for 3×3 heads"):
        run_verdicts(tmp_path)


def test_doc_unchanged_by_verdict():
    doc = roles_doc(heads={"1.2": {"induction": INDUCTION_CONFIRMED}})
    before = copy.deepcopy(doc)
    verdict("1.2", doc)
    assert doc == before


def _add_role(doc: dict, rid: str, head: str, score: float, control: float, effect: float, ci: list,
              control_effect: float | None = None, control_ci: list | None = None) -> dict:
    """Add role ``rid`` as the roles stage words it (its ROLE_TEXT / CAUSAL_TEXT), confirmed for ``head``."""
    from headscope.heads.roles import CAUSAL_TEXT, ROLE_TEXT
    L, H = doc["n_layers"], doc["n_heads"]
    l, h = map(int, head.split("."))
    grid = lambda v: [[copy.deepcopy(v) for _ in range(H)] for _ in range(L)]  # noqa: E731
    r = dict(ROLE_TEXT[rid]) | {"score": grid(0.01), "control": grid(0.01), "control_name": "uniform causal attention",
                                "ci": grid([0.0, 0.02]), "p": grid(0.5), "q_value": grid(0.9), "passed": grid(False),
                                "confirmed": grid(False), "threshold": 0.3}
    ct = {k: v for k, v in CAUSAL_TEXT[rid].items() if k != "key"}
    c = ct | {"ablation": "mean", "effect": grid(None), "ci": grid(None), "q_value": grid(None),
              "screen": grid(0.0), "passed": grid(False)}
    if "control_task" in ct:
        c |= {"control_effect": grid(None), "control_ci": grid(None)}
        c["control_effect"][l][h], c["control_ci"][l][h] = control_effect, control_ci
    r["score"][l][h], r["control"][l][h], r["q_value"][l][h], r["passed"][l][h] = score, control, 0.001, True
    c["effect"][l][h], c["ci"][l][h], c["q_value"][l][h], c["passed"][l][h] = effect, ci, 0.001, True
    r["causal"], r["confirmed"][l][h] = c, True
    doc["roles"][rid] = r
    doc["heads"][head]["shown"].append(rid)
    doc["heads"][head]["confirmed"].append(rid)
    return check_roles(doc)


def test_duplicate_token_head_confirmed_on_ioi_with_its_control_prompts():
    doc = _add_role(roles_doc(), "duplicate_token", "1.1", 0.65, 0.022, -0.204, [-0.294, -0.114],
                    control_effect=0.023, control_ci=[-0.026, 0.071])
    v = verdict("1.1", doc)
    assert v.confirmed == ("duplicate_token",)
    assert v.text == ("Duplicate-token head: attends to the previous occurrence of the current token (duplicate-token "
                      "score 0.65 vs 0.022 under uniform causal attention); ablating it changes the IO − S logit "
                      "difference on IOI prompts by -0.20 [-0.29, -0.11] (by 0.02 [-0.03, 0.07] when the subject "
                      "is not repeated).")
    row = v.rows[0]
    assert row["control_effect"] == 0.023 and row["control_ci"] == [-0.026, 0.071]


def test_local_head_confirmed_says_only_what_the_loss_showed():
    doc = _add_role(roles_doc(), "local", "0.2", 0.57, 0.022, 0.05, [0.02, 0.08])
    doc["heads"]["0.2"]["offset"] = 1
    v = verdict("0.2", doc)
    assert v.text == ("Local (fixed-offset) head (offset 1): attends to the token a fixed number of positions back "
                      "(fixed-offset attention 0.57 vs 0.022 under uniform causal attention); ablating it raises the "
                      "next-token loss on held-out text by 0.050 [0.020, 0.080] nats/token.")
    # not significant: shown only, with the ablation's numbers and why
    doc["roles"]["local"]["causal"]["passed"][0][2] = False
    doc["roles"]["local"]["confirmed"][0][2] = False
    doc["roles"]["local"]["causal"]["ci"][0][2] = [-0.01, 0.11]
    v = verdict("0.2", doc)
    assert v.confirmed == ()
    assert "ablation effect 0.05 [-0.01, 0.11] on held-out natural text: not significant" in v.text
