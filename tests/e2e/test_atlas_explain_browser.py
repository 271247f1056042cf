"""The atlas with explanations, scores and head labels: the data it is built from, then a real headless
browser (file://): the label at the top of a head page, explanations and scores on a feature page, and
one search box that finds heads, features and neurons by token and by explanation text."""

from __future__ import annotations

import json

import pytest

from headscope.atlas.collect import collect
from headscope.runs import RunDir, read_json
from headscope.testing.tiny import tiny_model

from test_atlas_browser import browser  # noqa: F401  (the shared chromium fixture)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from sae_helpers import small_corpus
    from headscope.atlas.build import build_atlas
    from headscope.explain.features import FeatureExplainOptions, FeatureScoreOptions, run_explain_features, \
        run_score_features
    from headscope.explain.head_label import LabelOptions, run_labels
    from headscope.sae.analysis import run_analysis
    from headscope.sae.options import AnalysisOptions
    from headscope.sae.dashboards import run_dashboards
    from headscope.sae.options import DashboardOptions, TrainOptions
    from headscope.sae.train import run_train
    tmp = tmp_path_factory.mktemp("e2e-explain")
    model = tiny_model("gpt2")
    run = RunDir(tmp / "run", model.identity())
    run_train(model, run, TrainOptions(layer=1, corpus=small_corpus(tmp), n_tokens=8192, batch_size=256,
                                       buffer_tokens=2048, expansion=2, architecture="topk", k=4, seq_len=64),
              progress=False)
    run_analysis(model, run, AnalysisOptions(name="L1"))
    run_dashboards(model, run, DashboardOptions(name="L1", n_tokens=1024, batch_size=4), page_size=16, progress=False)
    run_explain_features(model, run, FeatureExplainOptions(sae="L1", features=0, n_explain=5, n_test=4, windows=200),
                         progress=False)
    run_score_features(model, run, FeatureScoreOptions(sae="L1"), progress=False)
    run_labels(None, run, LabelOptions())
    build_atlas(run.path, progress=False)
    return run.path


def test_labels_cite_their_sources(run_dir):
    labels = read_json(run_dir / "explain/labels.json")["heads"]
    labelled = {k: v for k, v in labels.items() if v["label"]}
    assert labelled and all(k.startswith("1.") for k in labelled)   # the SAE is on layer 1; no other source
    for v in labelled.values():
        assert v["summary"] is None and v["facts"]
        for f in v["facts"]:
            assert (run_dir / f["source"]).is_file() and f["text"] in v["label"]
    explained = [f for v in labelled.values() for f in v["facts"] if "Fires on the tokens" in f["text"]]
    assert explained and all(f["source"].startswith("explain/features/L1/explanations_") for f in explained)


def test_feature_pages_get_explanations_and_scores(run_dir):
    src = collect(run_dir)["sources"]
    assert "feature_explanations" not in src["explain"]          # moved into the feature records
    feats = src["sae"]["features_L1"]
    ex = read_json(run_dir / "explain/features/L1/explanations_statistical.json")["features"]
    for f, e in ex.items():
        rows = feats[f]["explanations"]
        assert rows[0]["explanation"] == e["explanation"]
        assert rows[0]["scores"]["detection"]["shuffled_balanced_accuracy"] is not None or \
            rows[0]["scores"]["detection"]["balanced_accuracy"] is None
    row = src["explain"]["feature_scores"][0]
    assert row["sae"] == "L1" and row["probabilities"] == "rule" and "balanced_accuracy" in row["detection"]


def _first_token_of_an_explanation(run_dir) -> tuple[str, str]:
    ex = read_json(run_dir / "explain/features/L1/explanations_statistical.json")["features"]
    for f, e in ex.items():
        w = json.loads(e["explanation"].split("TOKENS ", 1)[1])
        for t in w:
            if t.isalpha() and len(t) >= 3:
                return f, t
    pytest.skip("no alphabetic token in the tiny model's explanations")


def test_browser_label_feature_page_and_search(browser, run_dir):  # noqa: F811
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    url = (run_dir / "atlas/index.html").as_uri()
    labels = read_json(run_dir / "explain/labels.json")["heads"]
    hk = next(k for k, v in labels.items() if v["label"])
    page.goto(url + "#/head/" + hk)
    page.wait_for_selector("#head-label")
    first_card = page.locator("main section.card").first
    assert first_card.get_attribute("id") == "head-label"           # at the top of the head page
    assert labels[hk]["facts"][0]["text"] in page.inner_text("#head-label")
    # one search box: a token from a feature's explanation finds that feature (and links to its page)
    f, word = _first_token_of_an_explanation(run_dir)
    page.goto(url + "#/")
    page.fill("#search", word)
    page.press("#search", "Enter")
    page.wait_for_selector(".hits-feature a")
    names = page.locator(".hits-feature a").all_inner_texts()
    assert f"L1 #{f}" in names
    page.locator(".hits-feature a", has_text=f"L1 #{f}").first.click()
    page.wait_for_selector("text=Explanations and their scores")
    body = page.inner_text("main")
    assert "detection:" in body and "shuffled explanation" in body and word in body.lower()
    # explanation text (not a token): the label's words find heads
    page.goto(url + "#/")
    page.fill("#search", "decoder norm")
    page.press("#search", "Enter")
    page.wait_for_selector(".hits-head a")
    assert hk in page.locator(".hits-head a").all_inner_texts()
    page.fill("#search", "zzqqxx-nothing")
    page.press("#search", "Enter")
    page.wait_for_selector("#hits >> text=No head matches")
    assert page.locator(".hits-feature a").count() == 0
    assert not errors, errors
    page.close()


class _Writer:
    """A stand-in LLM back-end that writes a fixed summary and records the prompts it got."""

    name = "stub"

    def __init__(self):
        self.prompts = []

    def complete_many(self, msgs):
        self.prompts += msgs
        return ["Writes summaries."] * len(msgs)


def test_llm_summary_from_the_facts_and_dropped_when_stale(run_dir, tmp_path):
    import shutil
    from headscope.explain.atlas_data import atlas_data
    from headscope.explain.head_label import LabelOptions, run_labels
    run_copy = tmp_path / "run"
    shutil.copytree(run_dir, run_copy, ignore=shutil.ignore_patterns("atlas"))
    run = RunDir(run_copy)
    w = _Writer()
    res = run_labels(None, run, LabelOptions(summary="openai"), progress=False, backend=w)
    assert res.summaries == res.heads == len(w.prompts) > 0
    labels = read_json(run_copy / "explain/labels.json")["heads"]
    hk = next(k for k, v in labels.items() if v["summary"])
    prompt = next(m[0]["content"] for m in w.prompts if f"head {hk} " in m[0]["content"])
    assert all(f["text"] in prompt for f in labels[hk]["facts"])   # the LLM sees the facts, and only those
    assert atlas_data(run_copy)["per_head"][hk]["label"]["summary"] == "Writes summaries."
    # new results change the facts: the old summary is no longer shown (a feature explanation that was not
    # scored is no fact, so the change is made to a fact the label states: the SAE's weight attribution)
    hj = run_copy / "sae/L1/heads.json"
    data = read_json(hj)
    for rec in data["heads"].values():
        for tf in rec.get("top_features", []):
            tf["attribution"] = 0.987
    hj.write_text(json.dumps(data))
    assert atlas_data(run_copy)["per_head"][hk]["label"]["summary"] is None
