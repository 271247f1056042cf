"""End-to-end on the real default model: the demo's atlas opened in Chromium on head 18.6 — the strongest
induction head of SmolLM2-135M — where a new user lands first. Its page must show what each instrument
found for it: the lens' tokens, the SAE features attributed to it, and the next-token neurons it drives.

Two atlases: ``small``, that of `headscope demo --small` (the demo's stages on the CI's budget, built once
per session and shared with tests/test_study_demo_slow.py), always; and ``full``, that of a finished
`headscope demo` run named by the environment variable HEADSCOPE_DEMO_RUN (ten minutes, too long for
every CI run: `headscope demo --out runs/demo && HEADSCOPE_DEMO_RUN=runs/demo scripts/test.sh
tests/e2e/test_demo_atlas_browser.py`), skipped when the variable is not set."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from test_atlas_browser import browser, new_page  # noqa: F401  (the shared chromium fixture)

pytestmark = pytest.mark.slow

HEAD = "18.6"


def _index(run) -> dict:
    text = (run / "atlas" / "data" / "index.js").read_text()
    return json.loads(re.fullmatch(r'window\.__atlas_page\("index",(.*)\);\n', text, re.S).group(1))


@pytest.fixture(params=["small", "full"])
def demo_run(request):
    """The run folder of the demo whose atlas is opened (see the module docstring)."""
    if request.param == "small":
        return request.getfixturevalue("demo_small_run")[0]
    full = os.environ.get("HEADSCOPE_DEMO_RUN")
    if not full:
        pytest.skip("HEADSCOPE_DEMO_RUN (a finished `headscope demo` run folder) is not set")
    run = Path(full)
    assert (run / "atlas" / "index.html").is_file(), f"{run} holds no atlas: is the demo finished?"
    return run


def test_head_18_6_page_shows_lens_features_and_neurons(browser, demo_run):  # noqa: F811
    run = demo_run
    scores = json.loads((run / "heads" / "scores.json").read_text())["scores"]["induction"]
    best = max(((l, h) for l in range(len(scores)) for h in range(len(scores[l]))), key=lambda lh: scores[lh[0]][lh[1]])
    assert f"{best[0]}.{best[1]}" == HEAD, "head 18.6 is the default model's strongest induction head"
    ev = json.loads((run / "lens" / "eval.json").read_text())["per_head"][HEAD]
    page, errors = new_page(browser)
    page.goto((run / "atlas" / "index.html").as_uri())
    page.wait_for_selector("#start-here")   # the first screen points to it
    assert HEAD in page.locator("#start-here a.headlink").all_inner_texts()
    page.goto((run / "atlas" / "index.html").as_uri() + f"#/head/{HEAD}")
    page.wait_for_selector("#head-title")
    assert page.inner_text("#head-title") == f"Head {HEAD}"
    # lens: held-out gain and its top tokens (an informative lens under the BH rule)
    assert ev["informative"], ev
    page.wait_for_selector(".lens-tokens .tok")
    assert page.locator(".lens-tokens .tok").count() >= 5
    # SAE features of layer 18 attributed to this head, each a link to its feature page
    page.wait_for_selector("a.featlink")
    assert page.locator("a.featlink").count() >= 1
    # the next-token neurons it drives in context (a pair to explain, or active on some of their prompts)
    page.wait_for_selector("text=Next-token neurons this head drives")
    card = page.locator("section", has_text="Next-token neurons this head drives")
    per_head = json.loads((run / "neurons" / "attribution.json").read_text())
    driven = {f"{n['layer']}.{n['neuron']}" for n in per_head["neurons"]
              if n["heads"].get(HEAD, {}).get("frac_train", 0) > 0 or n["heads"].get(HEAD, {}).get("frac_test", 0) > 0}
    assert driven, "head 18.6 drives no next-token neuron on any prompt of this run"
    links = set(card.locator("a").all_inner_texts())
    assert driven <= {x.strip() for x in links}, (driven, links)
    assert not errors, errors


def test_head_18_6_verdict_confirms_induction_and_reads_in_context(browser, demo_run):  # noqa: F811
    """The verdict leads 18.6's page: induction confirmed (score vs control, causal effect with CI), the roles
    table row marked confirmed, the grid coloured by its confirmed role, search by role name, and on the
    example prompt the head's own output ranks the token it attends to first somewhere (it copies).
    Needs the heads.roles stage in the demo (issue 20)."""
    run = demo_run
    roles = json.loads((run / "heads" / "roles.json").read_text())
    conf = roles["heads"][HEAD]["confirmed"]
    assert "induction" in conf, roles["heads"][HEAD]
    ind = roles["roles"]["induction"]
    effect = ind["causal"]["effect"][18][6]
    url = (run / "atlas" / "index.html").as_uri()
    page, errors = new_page(browser)
    page.goto(url)
    page.wait_for_selector("#start-here")
    assert HEAD in page.locator("#start-here a.headlink").all_inner_texts()
    assert "Induction head confirmed" in page.inner_text("#start-here")
    page.wait_for_selector(f'#grid td.cell[data-head="{HEAD}"]')
    assert page.get_attribute(f'#grid td.cell[data-head="{HEAD}"]', "data-role") == conf[0]
    page.fill("#search", "induction")
    page.press("#search", "Enter")
    page.wait_for_selector(".hits-head a")
    assert HEAD in page.locator(".hits-head a").all_inner_texts()
    page.goto(url + f"#/head/{HEAD}")
    page.wait_for_selector("#head-verdict")
    assert page.locator("main section.card").first.get_attribute("id") == "head-verdict"
    text = page.inner_text("#verdict-text")
    assert "Induction head" in text and f"{abs(effect):.2f}" in text, text
    assert "No role confirmed" not in text
    row = page.locator("#role-induction")
    assert "confirmed" in (row.get_attribute("class") or "") and "confirmed" in row.locator("td.state").inner_text()
    # read in context: where it attends, and the attended token ranked first by its direct logit contribution
    page.wait_for_selector("#context-table")
    assert page.locator("#context-table td.rank.top1").count() >= 1
    assert not errors, errors
