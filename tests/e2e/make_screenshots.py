"""Screenshots of the main atlas pages for the docs (not a test).

    python tests/e2e/make_screenshots.py RUN_DIR docs/ [--head 18.6] [--model default]

Opens RUN_DIR/atlas through `atlas serve` (with the run's model, so the live prompt page works) in
headless Debian chromium and writes atlas-grid.png, atlas-head.png, atlas-feature.png, atlas-neuron.png
and atlas-live.png into the output folder.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from test_atlas_browser import ARGS, chromium_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("out")
    ap.add_argument("--head", default=None, help="head for the head page (default: top induction head)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompt", default="The cat sat on the mat. The cat sat on the")
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from headscope.atlas.server import make_server, serve_in_thread
    from headscope.models.load import load_model
    run, out = Path(a.run_dir), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ix = json.loads(re.fullmatch(r'window\.__atlas_page\("index",(.*)\);\n',
                                 (run / "atlas/data/index.js").read_text(), re.S).group(1))
    head = a.head
    if head is None:
        m = next(m for m in ix["measures"] if m["id"] == "heads.induction")
        head = max(((v, f"{l}.{h}") for l, row in enumerate(m["values"]) for h, v in enumerate(row) if v is not None))[1]
    srv = make_server(run, model=load_model(a.model), port=0)
    serve_in_thread(srv)
    base = "http://%s:%d/" % srv.server_address[:2]
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=ARGS)
        page = b.new_page(viewport={"width": 1360, "height": 1000})
        page.goto(base + "#/")
        page.wait_for_selector("#grid td.cell")
        page.screenshot(path=str(out / "atlas-grid.png"), full_page=False)
        page.goto(base + "#/head/" + head)
        page.wait_for_selector("#head-title")
        page.wait_for_timeout(500)
        page.screenshot(path=str(out / "atlas-head.png"), full_page=True)
        for i, c in enumerate(ix["collections"]):
            if c["key"].startswith("features_") or c["key"] == "neurons":
                page.goto(base + f"#/list/{i}")
                page.wait_for_selector("table.data a")
                page.locator("table.data a").first.click()
                page.wait_for_selector("#item-title")
                page.wait_for_timeout(300)
                name = "atlas-feature.png" if c["key"].startswith("features_") else "atlas-neuron.png"
                page.screenshot(path=str(out / name), full_page=False)
        page.goto(base + "#/live")
        page.wait_for_selector("#live-prompt")
        page.fill("#live-prompt", a.prompt)
        page.fill("#live-heads", head)
        page.click("#live-run")
        page.wait_for_selector("#live-tokens", timeout=120000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(out / "atlas-live.png"), full_page=True)
        b.close()
    srv.shutdown()


if __name__ == "__main__":
    main()
