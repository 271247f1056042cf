"""The SAE section of a head page states the polysemanticity verdict with the test's power beside it
(planted groups detected on that head, from heads.json) and never claims monosemanticity; without a
power estimate it states no verdict but "not shown polysemantic", and says that nothing more is claimed. In a real headless browser (skipped, with the
reason, without one)."""

from __future__ import annotations

import pytest

from headscope.runs import RunDir, read_json
from headscope.testing.tiny import tiny_model
from test_atlas_browser import browser, new_page, no_injection  # noqa: F401  (the shared chromium fixture)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs with the constructed SAE on layer 1 (head 0 two roles, head 1 unrelated directions, head 2
    one cluster): one analysed with the power estimate, one without; an atlas built for each."""
    from headscope.atlas.build import build_atlas
    from headscope.sae.analysis import run_analysis
    from headscope.sae.io import save_sae
    from headscope.sae.options import AnalysisOptions
    from test_sae_analysis import constructed_sae
    model = tiny_model("gpt2")
    out = {}
    for key, n_planted in (("power", 8), ("none", 0)):
        run = RunDir(tmp_path_factory.mktemp("saeatlas") / "run", model.identity())
        save_sae(constructed_sae(model), run.path / "sae" / "C")
        run_analysis(model, run, AnalysisOptions(name="C", n_null=100, n_planted=n_planted, planted_cos=0.95),
                     progress=False)
        build_atlas(run.path, progress=False)
        out[key] = run.path
    return out


def sae_line(browser, run_dir, head: str) -> str:
    page, errors = new_page(browser)
    page.goto((run_dir / "atlas" / "index.html").as_uri() + f"#/head/{head}")
    page.wait_for_selector("p.sae-verdict")
    text = page.inner_text("p.sae-verdict")
    body = page.inner_text("body")
    no_injection(page)
    assert not errors, errors
    assert "monosemantic" not in body.lower()
    return text


def test_verdict_with_its_power(browser, runs):
    heads = read_json(runs["power"] / "sae" / "C" / "heads.json")["heads"]
    assert "polysemantic (2 groups among its top features" in sae_line(browser, runs["power"], "1.0")
    for h in ("1", "2"):
        rec = heads[h]
        by = rec["power"]["by_group_size"]
        counts = " / ".join(f"{by[g]['detected']}/{by[g]['planted']}" for g in ("2", "3", "5"))
        assert sae_line(browser, runs["power"], f"1.{h}") == (
            f"SAE C · {rec['verdict']} — not shown polysemantic; on this head the test detects two planted groups "
            f"of 2 / 3 / 5 features (pairwise cosine 0.95) in {counts} plantings")
    assert heads["1"]["verdict"] == "no structure beyond the null" and heads["2"]["verdict"] == "one group"


def test_without_power_nothing_more_is_claimed(browser, runs):
    line = sae_line(browser, runs["none"], "1.1")
    assert line == ("SAE C · not shown polysemantic; this test's power was not measured (sae analysis --n-planted), "
                    "so nothing more is claimed")
