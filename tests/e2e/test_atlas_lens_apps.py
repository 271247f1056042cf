"""The Attention Lens applications in the atlas (issue 24): a tiny run with ``lens steer-eval`` and
``lens scan`` (token list + contrast) → per head its steering rows next to the random direction and its
localisation next to the control list, the run's classifier against its baselines and the heads that
passed — in the data, and in a real headless browser (skipped, with the reason, without one)."""

from __future__ import annotations

import json
import os
import re

import pytest

from headscope.cli import main
from headscope.testing.tiny import save_tiny_model
from test_atlas_browser import browser, new_page, no_injection  # noqa: F401  (the shared chromium fixture)

EVIL = 'x <script>window.__xss=1</script> "><img src=x onerror="window.__xss=2"> y'
NO_CLAIM = "does not beat the control"


def read_page(path):
    m = re.fullmatch(r'window\.__atlas_page\(("[^"]*"),(.*)\);\n', path.read_text(), re.S)
    assert m
    return json.loads(m.group(2))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """lens train → steer-eval (heads 1.0, 2.3) → eval → scan with a token list and a contrast set → atlas.
    One control token is replaced by markup, which every page must show as text."""
    from headscope.atlas.build import build_atlas
    tmp = tmp_path_factory.mktemp("lensapps")
    model_dir = save_tiny_model("llama_gqa", tmp / "model")
    out = tmp / "run"
    common = ["--model", str(model_dir), "--out", str(out)]
    assert main(["lens", "train", *common, "--layers", "1-2", "--heads", "0,3", "--tokens", "0", "--init-tokens",
                 "256", "--seq-len", "32", "--batch-size", "2"]) == 0
    words = tmp / "words.txt"
    words.write_text("the\nof\nis\nto\nin\nvalue\nobject\nclass\n")
    assert main(["lens", "steer-eval", *common, "--heads", "1.0,2.3", "--tokens", str(words), "--n-tokens", "4",
                 "--n-prompts", "2", "--n-cost-prompts", "1", "--prompt-len", "8", "--new-tokens", "2",
                 "--strengths", "1", "4", "--resid-strengths", "0.5"]) == 0
    assert main(["lens", "eval", *common, "--tokens", "128"]) == 0
    a, b = tmp / "a.txt", tmp / "b.txt"
    a.write_text("# source: s1\nThe value of the object is\nthe type of the function\n# source: s2\n"
                 "of the class the module\nthe name of the attribute\n# source: s3\nthe list of the items\none of the keys\n")
    b.write_text("# source: s1\nRaise an error when\nReturn a new set\n# source: s2\nPrint all lines\nCall it twice\n"
                 "# source: s3\nOpen a file now\nRead bytes until\n")
    assert main(["lens", "scan", *common, "--token-list", str(words), "--prompts", str(a), "--contrast", str(b)]) == 0
    scan = json.loads((out / "lens" / "scan.json").read_text())
    scan["localisation"]["control_tokens"][0] = EVIL
    (out / "lens" / "scan.json").write_text(json.dumps(scan))
    build_atlas(out, progress=False)
    return out


def steer_rows(run_dir) -> list[dict]:
    return json.loads((run_dir / "lens" / "steer_eval.json").read_text())["tests"]


def head_lens(run_dir, head: str) -> dict:
    layer, h = head.split(".")
    return read_page(run_dir / "atlas" / "data" / "layer" / f"{layer}.js")["heads"][h]["lens"]


def test_atlas_data_has_each_application_next_to_its_control(run_dir):
    rows = steer_rows(run_dir)
    ix = read_page(run_dir / "atlas" / "data" / "index.js")
    g = ix["globals"]["lens"]
    # the run level: which heads passed steering and localisation, the classifier against its baselines
    assert g["steer_eval"]["heads"] == ["1.0", "2.3"]
    assert g["steer_eval"]["passed"] == [n for n in ("1.0", "2.3") if any(r["passes"] for r in rows if r["head"] == n)]
    cl = g["scan"]["classifier"]
    assert set(cl["auroc"]) == {"lens", "bag_of_words", "unembed", "random_heads"}
    assert set(cl["vs_lens"]) == {"bag_of_words", "unembed", "random_heads"}
    assert cl["beats_baselines"] == all(v["lens_better"] for v in cl["vs_lens"].values())
    loc = json.loads((run_dir / "lens" / "scan.json").read_text())["localisation"]
    assert g["scan"]["localisation"]["localised"] == [n for n, v in loc["per_head"].items() if v["localised"]]
    # per head: the row shown for each direction is one of the tested rows, with its control and q-value
    for head in ("1.0", "2.3"):
        st = head_lens(run_dir, head)["steering"]
        assert set(st["directions"]) == {"unembed", "lens"}
        for d, r in st["directions"].items():
            tested = [t for t in rows if t["head"] == head and t["direction"] == d]
            same = next(t for t in tested if t["strength"] == r["strength"])
            assert r["dlogp_random"] == same["dlogp_random"] and r["diff_ci"] == same["diff_ci"]
            assert r["passes"] == same["passes"]
            assert r["passes"] == (r["q_value"] is not None and r["q_value"] <= 0.05 and r["diff"] > 0)
            if not any(t["passes"] for t in tested):
                assert r["diff"] == max(t["diff"] for t in tested)
        assert head_lens(run_dir, head)["applications"]["steering"] == st["steers"]
    for head in ("1.0", "1.3", "2.0", "2.3"):
        lc = head_lens(run_dir, head)["localisation"]
        assert lc["localised"] == (lc["q_value"] is not None and lc["q_value"] <= 0.05)
        assert head_lens(run_dir, head)["applications"]["localisation"] == lc["localised"]
    # the application numbers are grids too (colour the layer × head grid by them)
    ids = {m["id"] for m in ix["measures"]}
    assert {"lens.steering.unembed_diff", "lens.applications.steering", "lens.localisation.q_value"} <= ids


# -- in a real browser (the shared chromium fixture and helpers of test_atlas_browser.py) ----------------------


def num(text: str) -> float:
    return float(re.match(r"\s*([+-]?[0-9.]+(?:e[+-]?\d+)?)", text).group(1))


def test_head_page_shows_steering_against_its_control(browser, run_dir, tmp_path):
    rows = steer_rows(run_dir)
    page, errors = new_page(browser)
    url = (run_dir / "atlas" / "index.html").as_uri()
    failures = 0
    for head in ("1.0", "2.3"):
        data = head_lens(run_dir, head)
        page.goto(url + f"#/head/{head}")
        page.wait_for_selector("#steer-table tr.steer-row")
        assert "Applications (Attention Lens paper), measured" in page.inner_text("#lens-apps")
        trs = page.locator("#steer-table tr.steer-row")
        assert trs.count() == 2
        for i in range(2):
            tr = trs.nth(i)
            d = tr.get_attribute("data-direction")
            r = data["steering"]["directions"][d]
            # the effect next to the random direction's of the same norm, the difference with its CI
            assert num(tr.locator("td").nth(2).inner_text()) == pytest.approx(r["dlogp"], abs=2e-3)
            assert num(tr.locator("td.steer-control").inner_text()) == pytest.approx(r["dlogp_random"], abs=2e-3)
            assert "[" in tr.locator("td").nth(4).inner_text()
            text = tr.inner_text()
            if r["passes"]:
                assert "yes — beats the control" in text and NO_CLAIM not in text
            else:
                failures += 1
                assert f"no — {NO_CLAIM}" in text and "beats the control" not in text.replace(NO_CLAIM, "")
        passed = page.inner_text("#apps-passed")
        assert ("steering: yes" in passed) == data["steering"]["steers"]
        assert ("steering: no — " + NO_CLAIM in passed) == (not data["steering"]["steers"])
        loc = page.inner_text("#loc-table tr.loc-row")
        assert (NO_CLAIM in loc) == (not data["localisation"]["localised"])
        if head == "1.0" and os.environ.get("HEADSCOPE_SCREENSHOT"):
            page.screenshot(path=os.environ["HEADSCOPE_SCREENSHOT"], full_page=True)
    assert failures == sum(1 for h in ("1.0", "2.3") for r in head_lens(run_dir, h)["steering"]["directions"].values()
                           if not r["passes"])
    assert any(not r["passes"] for r in rows), "the tiny run should have a steering test that fails"
    # a lensed head that was not steered shows no steering table (only what was measured)
    page.goto(url + "#/head/1.3")
    page.wait_for_selector("#loc-table")
    assert page.locator("#steer-table").count() == 0
    # and a lens with no application measured renders without the block (not an empty one)
    assert page.evaluate("() => RENDER.lens({kl_lens: 1, gain: 0.1, informative: true}).querySelector('#lens-apps')") is None
    # the run's summary on the grid page: the classifier against its baselines, the heads that passed
    page.goto(url + "#/")
    page.wait_for_selector("#lens-apps-summary")
    ix = read_page(run_dir / "atlas" / "data" / "index.js")
    cl = ix["globals"]["lens"]["scan"]["classifier"]
    assert page.locator("#classifier-table tr.clf-row").count() == 4
    verdict = page.inner_text("#classifier-verdict")
    assert ("beats every baseline" in verdict) == cl["beats_baselines"]
    assert (NO_CLAIM in verdict) == (not cl["beats_baselines"])
    steer = page.inner_text("#steer-passed")
    for h in ix["globals"]["lens"]["steer_eval"]["passed"]:
        assert h in steer.split("—")[0]
    if not ix["globals"]["lens"]["steer_eval"]["passed"]:
        assert "none" in steer.split("—")[0]
    assert EVIL in page.inner_text("#lens-apps-summary").replace("␣", " ")
    no_injection(page)
    assert not errors, errors
