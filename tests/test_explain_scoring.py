"""Score arithmetic, the keyword-contrast baseline, the local HF P(Yes)/P(No) scorer, prompts."""

import pytest
import torch

from headscope.explain.hf_local import LocalHFExplainer
from headscope.explain.keyword import KeywordBaseline, contrast, ngrams
from headscope.explain.prompts import (ClassifyRequest, ExplainRequest, classify_messages, example_text,
                                       explain_messages, parse_yes_no)
from headscope.explain.stages import balanced_accuracy
from headscope.testing.tiny import tiny_model


def test_balanced_accuracy_arithmetic():
    truth = [True, True, True, False, False]
    pred = [True, False, True, False, True]
    r = balanced_accuracy(pred, truth)
    assert r["TPR"] == pytest.approx(2 / 3) and r["TNR"] == pytest.approx(1 / 2)
    assert r["E"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert balanced_accuracy([True] * 5, truth)["E"] == 0.5          # always Yes: chance
    assert balanced_accuracy(truth, truth)["E"] == 1.0
    assert balanced_accuracy([not t for t in truth], truth)["E"] == 0.0
    skipped = balanced_accuracy([True, False], [True, True])
    assert skipped["E"] is None and "one class" in skipped["skipped"]


def test_keyword_contrast_and_classifier():
    active = ["the class defines a method", "a class with one method", "class attributes and methods"]
    inactive = ["the loop runs forever", "a function returns a value", "the class of errors"]
    c = {g: (d, n) for g, d, n in contrast(active, inactive, max_n=2)}
    assert c["class"] == (pytest.approx(1 - 1 / 3), 3)
    assert c["method"][0] == pytest.approx(2 / 3)
    kb = KeywordBaseline(top=2, max_n=2)
    [expl] = kb.explain_many([ExplainRequest(active, inactive, " foo")])
    assert KeywordBaseline.parse(expl) == ["class", "method"] or set(KeywordBaseline.parse(expl)) <= set(c)
    kws = KeywordBaseline.parse(expl)
    assert all(c[k][0] > 0 and c[k][1] >= 2 for k in kws)
    best = max(d for d, n in c.values() if n >= 2)
    assert c[kws[0]][0] == pytest.approx(best)
    probs = kb.classify_many([ClassifyRequest(expl, "my class has a method"), ClassifyRequest(expl, "nothing here")])
    assert probs == [1.0, 0.0]
    assert kb.classify_many([ClassifyRequest("free text explanation", "class method")]) == [0.0]
    assert "class method" in ngrams("Class  method!", 2)


def test_examples_and_prompts():
    assert example_text(["<bos>", "Hello", "\n", " world"], " again") == "Hello  world again"
    assert "\n" not in example_text(["<s>", "a\nb"], "c")
    msgs = explain_messages(ExplainRequest(["x y"], ["z"], " tok"))
    assert "ACTIVE examples:\n1. x y" in msgs[1]["content"] and "INACTIVE examples:\n1. z" in msgs[1]["content"]
    assert "two to three sentences" in msgs[1]["content"]
    q = classify_messages(ClassifyRequest("Fires on X.", "an example"))[1]["content"]
    assert q.endswith("Is the given example an active example? (Yes/No)") and "Fires on X." in q
    assert [parse_yes_no(t) for t in ("Yes", " yes.", "No", "**No**", "maybe")] == [1.0, 1.0, 0.0, 0.0, None]


def test_local_hf_p_yes_is_one_forward_pass_softmax_ratio():
    m = tiny_model("llama_gqa")
    ex = LocalHFExplainer(m, max_new_tokens=8)
    assert ex.yes_ids and ex.no_ids
    req = ClassifyRequest("Active on numbers.", "there are 3 cats")
    p = ex.classify_many([req])[0]
    ids = ex._ids(classify_messages(req))
    probs = torch.softmax(m.hf(ids).logits[0, -1].double(), -1)
    y, n = probs[ex.yes_ids].sum().item(), probs[ex.no_ids].sum().item()
    assert p == pytest.approx(y / (y + n), rel=1e-5)
    a = ex.explain_many([ExplainRequest(["one two"], ["three"], " four")])
    b = ex.explain_many([ExplainRequest(["one two"], ["three"], " four")])
    assert isinstance(a[0], str) and a == b                                  # greedy: deterministic
