"""End-to-end: the atlas of a tiny run in a real headless browser (Debian's chromium + Playwright).

Opens the static site from disk (file://), clicks a head, reads its lens tokens and SAE features, opens
a feature page, searches by token; then types live prompts into `atlas serve`. Token text includes
markup that must render as text. Skipped, with the reason, only where no browser can be started.
"""

from __future__ import annotations

import os
import shutil

import pytest

from headscope.testing.study import tiny_study
from headscope.testing.tiny import tiny_model

EVIL = 'x <script>window.__xss=1</script> "><img src=x onerror="window.__xss=2"> y'
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]

TINY_STUDY = tiny_study("heads.score", "lens.train", "lens.eval", "sae.train", "sae.analysis", "sae.dashboards",
                        tables={"lens.train": {"layers": "1-2", "heads": "all", "tokens": 1024, "init_tokens": 1024},
                                "lens.eval": {"tokens": 512}, "sae": {"name": "L1"},
                                "sae.train": {"n_tokens": 4096}, "sae.dashboards": {"n_tokens": 1024}})


def chromium_path() -> str | None:
    for p in (os.environ.get("HEADSCOPE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser")):
        if p and os.path.exists(p):
            return p
    return None


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no chromium found (apt-get install chromium, or set HEADSCOPE_CHROMIUM)")
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=exe, args=ARGS)
    except Exception as e:  # noqa: BLE001
        pw.stop()
        pytest.skip(f"chromium at {exe} cannot start: {str(e).splitlines()[0]}")
    yield b
    b.close()
    pw.stop()


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama_gqa")


@pytest.fixture(scope="module")
def run_dir(tiny, tmp_path_factory):
    from headscope.atlas.build import build_atlas
    from headscope.study import run_study
    out = tmp_path_factory.mktemp("e2e") / "run"
    cfg_path = out.parent / "study.toml"
    cfg_path.write_text(TINY_STUDY)
    from headscope.study import load_config
    run_study(load_config(cfg_path), out=out, model=tiny)
    build_atlas(out, model=tiny, examples=["The cat sat on the mat. The cat sat", EVIL], progress=False)
    return out


def gains(run_dir) -> dict[str, float]:
    """Held-out information gain of each lensed head ("L.H" -> bits/token)."""
    import json
    per_head = json.loads((run_dir / "lens" / "eval.json").read_text())["per_head"]
    return {k: v["gain"] for k, v in per_head.items()}


def best_head(run_dir) -> str:
    g = gains(run_dir)
    return max(g, key=g.get)


def new_page(browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: (errors.append("dialog " + d.message), d.dismiss()))
    return page, errors


def no_injection(page):
    assert page.evaluate("window.__xss") is None
    assert page.locator("img").count() == 0
    assert page.locator("script").evaluate_all("els => els.filter(e => !e.src).length") == 0


def test_static_atlas_head_lens_features(browser, run_dir, tiny):
    page, errors = new_page(browser)
    page.goto((run_dir / "atlas" / "index.html").as_uri())
    page.wait_for_selector("#grid td.cell")
    assert page.locator("#grid td.cell").count() == tiny.n_layers * tiny.n_heads
    labels = page.locator("#measure option").all_inner_texts()
    assert any("induction" in x for x in labels) and any("lens" in x for x in labels) and any("sae" in x for x in labels)
    page.select_option("#measure", label=next(x for x in labels if "prev" in x))
    head = best_head(run_dir)
    assert gains(run_dir)[head] > 0, "the tiny run should have at least one informative lens"
    page.click(f'#grid td.cell[data-head="{head}"]')
    page.wait_for_selector("#head-title")
    assert page.inner_text("#head-title") == f"Head {head}"
    # its lens' top tokens on the example prompt, next to the unembedding baseline
    page.wait_for_selector(".lens-tokens .tok")
    assert page.locator(".lens-tokens .tok").count() >= 5
    # a head whose lens has no gain over the null lens shows no lens tokens, and says why
    silent = [k for k, v in gains(run_dir).items() if v <= 0]
    if silent:
        page.goto((run_dir / "atlas" / "index.html").as_uri() + f"#/head/{silent[0]}")
        page.wait_for_selector("text=reads nothing beyond base rates")
        assert page.locator(".lens-tokens .tok").count() == 0
    # a layer-1 head's SAE features by weight attribution (the SAE is on layer 1); open one
    page.goto((run_dir / "atlas" / "index.html").as_uri() + "#/head/1.2")
    page.wait_for_selector("a.featlink")
    feats = page.locator("a.featlink")
    assert feats.count() >= 1
    feats.first.click()
    page.wait_for_selector("#item-title")
    page.wait_for_selector("text=Max-activating examples")  # the feature's data page loads asynchronously
    page.wait_for_selector(".example .tok")
    assert page.locator(".example .tok").count() > 0
    # the escaped example prompt: markup shown as text in the pattern view of a head page
    page.goto((run_dir / "atlas" / "index.html").as_uri() + "#/head/2.1")
    page.wait_for_selector("#pattern-prompt")
    page.select_option("#pattern-prompt", index=1)
    page.wait_for_selector("table.pat")
    text = "".join(page.locator("table.pat th.dst").all_inner_texts())
    assert "<script>window.__xss=1</script>" in text and '"><img src=x onerror=' in text.replace("␣", " ")
    no_injection(page)
    # search by token highlights heads
    page.goto((run_dir / "atlas" / "index.html").as_uri() + "#/")
    page.wait_for_selector("#grid td.cell")
    first_tok = page.evaluate("""async () => {
        const ix = A.index; const sh = ix.search_shards.find(s => /[a-z]/.test(s)) || ix.search_shards[0];
        const p = await load('search/' + sh); return Object.keys(p.tokens)[0]; }""")
    page.fill("#search", first_tok)
    page.press("#search", "Enter")
    page.wait_for_selector("#grid td.hit")
    assert page.locator("#grid td.hit").count() >= 1
    assert not errors, errors


def index_data(run_dir) -> dict:
    """The built atlas's data/index.js, parsed."""
    import json
    import re
    text = (run_dir / "atlas" / "data" / "index.js").read_text()
    return json.loads(re.fullmatch(r'window\.__atlas_page\("index",(.*)\);\n', text, re.S).group(1))


def test_start_here_card(browser, run_dir, tiny, tmp_path):
    hl = index_data(run_dir)["highlights"]
    assert hl, "the tiny run should have at least one head with a finding"
    page, errors = new_page(browser)
    page.goto((run_dir / "atlas" / "index.html").as_uri())
    page.wait_for_selector("#start-here")
    # the card comes before the grid, lists the highlights in order, each with its reason
    assert page.evaluate("""() => !!(document.getElementById('start-here').compareDocumentPosition(
        document.getElementById('grid')) & Node.DOCUMENT_POSITION_FOLLOWING)""")
    items = page.locator("#start-here li")
    assert items.count() == len(hl)
    assert page.locator("#start-here li a.headlink").all_inner_texts() == [x["head"] for x in hl]
    assert hl[0]["reason"] in items.first.inner_text()
    page.locator("#start-here li a.headlink").first.click()
    page.wait_for_selector("#head-title")
    assert page.inner_text("#head-title") == f"Head {hl[0]['head']}"
    assert page.url.endswith(f"#/head/{hl[0]['head']}")
    # a run with nothing in it: no card (and no empty one)
    from headscope.atlas.build import build_atlas
    from headscope.runs import RunDir
    empty = RunDir(tmp_path / "empty", tiny.identity())
    build_atlas(empty.path, progress=False)
    page.goto((empty.path / "atlas" / "index.html").as_uri())
    page.wait_for_selector("#grid td.cell")
    assert page.locator("#start-here").count() == 0
    assert not errors, errors


def test_live_prompt_against_serve(browser, run_dir, tiny):
    from headscope.atlas.server import make_server, serve_in_thread
    srv = make_server(run_dir, model=tiny, port=0)
    serve_in_thread(srv)
    try:
        host, port = srv.server_address[:2]
        page, errors = new_page(browser)
        page.goto(f"http://{host}:{port}/#/live")
        page.wait_for_selector("#live-prompt")
        page.fill("#live-prompt", EVIL)
        other = "2.0" if best_head(run_dir) != "2.0" else "1.2"
        page.fill("#live-heads", f"{best_head(run_dir)}, {other}")
        page.click("#live-run")
        page.wait_for_selector("#live-tokens", timeout=60000)
        text = "".join(page.locator("#live-tokens .tok").all_inner_texts())
        assert "<script>window.__xss=1</script>" in text
        page.wait_for_selector(".lens-tokens .tok")
        assert page.locator("table.pat").count() == 2
        assert "features firing at each position" in page.inner_text("#live-out")
        no_injection(page)
        # a bad request shows the server's message; the next good one works
        page.fill("#live-heads", "99.99")
        page.click("#live-run")
        page.wait_for_selector("#live-error")
        assert "does not exist" in page.inner_text("#live-error")
        page.fill("#live-heads", "0.1")
        page.click("#live-run")
        page.wait_for_selector("#live-tokens", timeout=60000)
        assert page.locator("table.pat").count() == 1
        # the head page's own prompt box (served mode)
        page.goto(f"http://{host}:{port}/#/head/1.1")
        page.wait_for_selector("#head-prompt")
        page.fill("#head-prompt", "A B C A B")
        page.press("#head-prompt", "Enter")
        page.wait_for_selector("#pattern-body table.pat", timeout=60000)
        assert not errors, errors
    finally:
        srv.shutdown()
        srv.server_close()
