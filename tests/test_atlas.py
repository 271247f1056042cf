"""The atlas data builder and its pages (tiny random models; no browser — see tests/e2e/)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from headscope.atlas import build as atlas_build
from headscope.atlas import collect as atlas_collect
from headscope.atlas.build import build_atlas, normalize_token, page_js, shard_of
from headscope.errors import HeadscopeError
from headscope.runs import RunDir, write_json
from headscope.testing.tiny import tiny_model

EVIL = '<script>alert(1)</script> "><img src=x onerror=alert(2)> &amp; \u2028'


def read_page(path):
    """Parse a data page written as ``window.__atlas_page(key, data);``."""
    text = path.read_text()
    m = re.fullmatch(r'window\.__atlas_page\(("[^"]*"),(.*)\);\n', text, re.S)
    assert m, text[:200]
    return json.loads(m.group(1)), json.loads(m.group(2))


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama_gqa")


@pytest.fixture(scope="module")
def scored_run(tiny, tmp_path_factory):
    from headscope.heads.instrument import ScoreOptions
    from headscope.heads.scores import run_head_scores
    run = RunDir(tmp_path_factory.mktemp("run") / "r", tiny.identity())
    run_head_scores(tiny, run, ScoreOptions(n_seqs=4, half_len=8, prefix_examples=4, prefix_lengths=[1, 2]),
                    progress=False)
    return run


def test_page_js_escapes_markup():
    js = page_js("x", {"t": EVIL}).decode()
    body = js[len('window.__atlas_page("x",'):-3]
    assert "<" not in body and ">" not in body and "&" not in body and "\u2028" not in body
    assert json.loads(body) == {"t": EVIL}


def test_build_heads_only(scored_run, tiny):
    res = build_atlas(scored_run.path, model=tiny, examples=["A B C A B C", EVIL], progress=False)
    root = scored_run.path / "atlas"
    assert res["sources"] == ["heads", "explain"] and (root / "index.html").is_file()  # explain: labels from the scores
    assert (root / "static" / "atlas.js").is_file() and (root / "static" / "atlas.css").is_file()
    key, ix = read_page(root / "data" / "index.js")
    assert key == "index" and ix["n_layers"] == tiny.n_layers and ix["n_heads"] == tiny.n_heads
    scores = json.loads((scored_run.path / "heads" / "scores.json").read_text())
    grids = {m["id"]: m["values"] for m in ix["measures"]}
    for name in ("induction", "prev_token", "duplicate_token"):
        assert grids[f"heads.{name}"] == scores["scores"][name]
    assert ix["examples"][1]["tokens"][0] == tiny.token_str([tiny.bos_id])[0]
    joined = "".join(ix["examples"][1]["tokens"][1:])  # at most MAX_EXAMPLE_TOKENS tokens
    assert len(joined) > 20 and EVIL.startswith(joined)
    # the example patterns equal HF's own attention weights (an independent computation)
    ids = tiny.to_tokens(EVIL)[:, :atlas_build.MAX_EXAMPLE_TOKENS]
    tiny.hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = tiny.hf(input_ids=ids, output_attentions=True).attentions
    finally:
        tiny.hf.set_attn_implementation("sdpa")
    for layer in range(tiny.n_layers):
        _, page = read_page(root / "data" / "layer" / f"{layer}.js")
        assert page["layer"] == layer and set(page["heads"]) == {str(h) for h in range(tiny.n_heads)}
        assert page["heads"]["1"]["heads"]["induction"] == scores["scores"]["induction"][layer][1]
        assert page["heads"]["0"]["heads"]["prefix_induction"]["scores"] == \
            [p[layer][0] for p in scores["prefix_induction"]["scores"]]
        pat = torch.tensor(page["patterns"][1]["heads"]["2"])
        torch.testing.assert_close(pat, att[layer][0, 2], atol=1.5e-3, rtol=0)


def test_rebuild_replaces_and_no_tmp_left(scored_run):
    build_atlas(scored_run.path, model=None, progress=False)
    build_atlas(scored_run.path, model=None, progress=False)
    names = [p.name for p in scored_run.path.iterdir()]
    assert not [n for n in names if n.startswith(".atlas")]
    _, ix = read_page(scored_run.path / "atlas" / "data" / "index.js")
    assert ix["examples"] == []


def test_absent_and_failing_instruments(tmp_path, tiny, monkeypatch):
    run = RunDir(tmp_path / "r", tiny.identity())
    res = build_atlas(run.path, progress=False)  # nothing in the run: an empty atlas, no fake sections
    assert res["sources"] == [] and res["errors"] == {}
    _, ix = read_page(run.path / "atlas" / "data" / "index.js")
    assert ix["measures"] == [] and ix["collections"] == []

    def broken(name, run_dir):
        if name == "lens":
            raise RuntimeError("lens bug")
        if name == "sae":
            raise HeadscopeError("missing file: sae/x/cfg.json")
        return None
    monkeypatch.setattr(atlas_collect, "_instrument", broken)
    got = atlas_collect.collect(run.path)
    assert got["sources"] == {} and list(got["errors"]) == ["lens"] and "lens bug" in got["errors"]["lens"]


def test_instrument_data_pages_search_and_measures(tmp_path, tiny, monkeypatch):
    run = RunDir(tmp_path / "r", tiny.identity())
    feats = {str(i): {"density": i / 100, "top_logits": [f"tok{i}"], "examples": [
        {"tokens": ["a", EVIL], "acts": [0.0, float(i)]}]} for i in range(120)}
    fake = {
        "lens": {"per_head": {"0.1": {"kl_gain": 0.5, "top_tokens": [" The", EVIL], "kl": {"lens": 1.0, "baseline": 2.0}},
                              "2.3": {"kl_gain": float("nan"), "top_tokens": ["the"]},
                              "9.9": {"kl_gain": 3.0}}},
        "sae": {"per_head": {"1.0": {"polysemanticity": 0.9}}, "features": feats, "summary": {"l0": 12.5}},
    }
    monkeypatch.setattr(atlas_collect, "_instrument", lambda name, run_dir: fake.get(name))
    build_atlas(run.path, progress=False)
    root = run.path / "atlas" / "data"
    _, ix = read_page(root / "index.js")
    ms = {m["id"]: m for m in ix["measures"]}
    assert set(ms) == {"lens.kl_gain", "lens.kl.lens", "lens.kl.baseline", "sae.polysemanticity"}
    assert ms["lens.kl_gain"]["values"][0][1] == 0.5 and ms["lens.kl_gain"]["values"][2][3] is None  # NaN → None
    assert ms["lens.kl_gain"]["max"] == 0.5  # head 9.9 does not exist in this model: left out
    assert ix["globals"]["sae"]["summary"] == {"l0": 12.5}
    (coll,) = ix["collections"]
    assert coll["n"] == 120 and coll["source"] == "sae" and coll["key"] == "features"
    _, ids = read_page(root / "c" / "sae" / "features" / "ids.js")
    assert ids["ids"] == [str(i) for i in range(120)] and ids["summary"][7] == ["7", {"density": 0.07}]
    _, chunk2 = read_page(root / "c" / "sae" / "features" / "2.js")
    assert sorted(chunk2["items"], key=int) == [str(i) for i in range(100, 120)]
    assert chunk2["items"]["101"]["examples"][0]["tokens"][1] == EVIL
    _, shard = read_page(root / "search" / "t.js")
    assert sorted(shard["tokens"]["the"]) == ["0.1", "2.3"]
    _, other = read_page(root / "search" / f"{shard_of(normalize_token(EVIL))}.js")
    assert other["tokens"][normalize_token(EVIL)] == ["0.1"]
    _, l0 = read_page(root / "layer" / "0.js")
    assert l0["heads"]["1"]["lens"]["top_tokens"] == [" The", EVIL]
    assert l0["heads"]["0"] == {}


def test_build_errors(tmp_path, tiny):
    with pytest.raises(HeadscopeError, match="no run.json"):
        build_atlas(tmp_path, progress=False)
    run = RunDir(tmp_path / "r", tiny.identity())
    (run.path / "heads").mkdir()
    write_json(run.path / "heads" / "scores.json", {"n_layers": 3, "n_heads": 4, "scores": {"induction": [[0.1]]}})
    got = atlas_collect.collect(run.path)
    assert "heads" in got["errors"] and "grid" in got["errors"]["heads"]
    other = tiny_model("gpt2")
    with pytest.raises(HeadscopeError, match="made for model"):
        build_atlas(run.path, model=other, progress=False)


def test_unsafe_page_key_refused(tmp_path, tiny, monkeypatch):
    run = RunDir(tmp_path / "r", tiny.identity())
    monkeypatch.setattr(atlas_collect, "_instrument",
                        lambda name, d: {"per_head": {}, "../evil": {"a": {"x": 1}}} if name == "sae" else None)
    build_atlas(run.path, progress=False)  # the collection key is sanitised into the page path
    assert (run.path / "atlas" / "data" / "c" / "sae" / "___evil" / "ids.js").is_file()
    assert not (run.path / "atlas" / "data" / "c" / "evil").exists()
    assert not atlas_build.SAFE_KEY.match("..") and not atlas_build.SAFE_KEY.match("a/b")


def test_cli_build_and_errors(scored_run, tmp_path, capsys):
    from headscope.cli import main
    assert main(["atlas", "build", str(scored_run.path), "--no-model"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == (scored_run.path / "atlas" / "index.html").resolve().as_uri()
    assert main(["atlas", "build", str(tmp_path / "nothing")]) == 2
    assert "no run.json" in capsys.readouterr().err
    assert main(["atlas", "serve", str(tmp_path / "nothing")]) == 2


def test_model_spec_for(tmp_path, tiny):
    from headscope.atlas.commands import model_spec_for
    from headscope.models.load import DEFAULT_NAME
    run = RunDir(tmp_path / "r", tiny.identity())
    assert model_spec_for(run.path, None) is None and model_spec_for(run.path, "gpt2") == "gpt2"
    write_json(run.path / "study.json", {"model": {"spec": "/models/x"}})
    assert model_spec_for(run.path, None) == "/models/x"
    run2 = RunDir(tmp_path / "r2", {**tiny.identity(), "model": DEFAULT_NAME})
    assert model_spec_for(run2.path, None) == "default"
