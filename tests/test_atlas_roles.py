"""The atlas with head roles (RUN/heads/roles.json): the verdict and roles table on the head page data, the
grid's confirmed-role colouring, the Start-here card ranked by confirmed causal effect, search by role
name, and every head read in context on the example prompts (tiny random model; no browser)."""

from __future__ import annotations

import pytest

from headscope.atlas.build import build_atlas
from headscope.runs import RunDir, write_json
from headscope.testing.tiny import tiny_model
from roles_helpers import INDUCTION_CONFIRMED, roles_doc
from test_atlas import read_page

PROMPTS = ["The cat sat on the mat. The cat sat on the mat.", "one two three one two three"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama_gqa")


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    from headscope.heads.instrument import ScoreOptions
    from headscope.heads.scores import run_head_scores
    run = RunDir(tmp_path_factory.mktemp("roles") / "r", tiny.identity())
    run_head_scores(tiny, run, ScoreOptions(n_seqs=4, half_len=8, prefix_examples=0), progress=False)
    doc = roles_doc(tiny.n_layers, tiny.n_heads, heads={
        "2.1": {"induction": INDUCTION_CONFIRMED},                                         # z ≈ 13
        "1.3": {"copying": {"score": 0.4, "effect": -2.0, "effect_ci": [-2.2, -1.8]}},       # z ≈ 39
        "2.2": {"induction": {"score": 0.5, "effect": 0.2, "effect_ci": [0.1, 0.3]}},
        "0.2": {"sink": {"score": 0.9, "control": 0.1}}})                                   # shown only
    write_json(run / "heads" / "roles.json", doc)
    build_atlas(run.path, model=tiny, examples=PROMPTS, progress=False)
    return run.path


def test_index_role_grid_and_start_here(built, tiny):
    _, ix = read_page(built / "atlas" / "data" / "index.js")
    assert ix["roles"]["induction"] == "Induction head" and len(ix["roles"]) == 4
    g = ix["role_grid"]
    assert g[2][1] == "induction" and g[1][3] == "copying" and g[2][2] == "induction"
    assert g[0][2] is None                                  # shown by score only: not coloured as a role
    assert sum(x is not None for row in g for x in row) == 3
    hl = ix["highlights"]
    # one list per role, ordered by the best standardised effect: copying (z≈39) before induction (z≈13);
    # within induction, the larger effect first (2.1: 0.41 before 2.2: 0.2)
    assert [x["head"] for x in hl[:2]] == ["1.3", "2.1"] and all(x["source"] == "roles" for x in hl[:2])
    assert "Copying head confirmed" in hl[0]["reason"] and "-2.00 [-2.20, -1.80]" in hl[0]["reason"]
    assert [x["head"] for x in hl if x["source"] == "roles"] == ["1.3", "2.1", "2.2"]
    assert "0.2" not in [x["head"] for x in hl]
    assert not any(m["id"].startswith("heads.roles") for m in ix["measures"])   # no junk grid measures
    assert any(c["key"] == "roles" for c in ix["collections"])                  # a page listing the roles


def test_head_page_data_leads_with_the_verdict(built):
    _, page = read_page(built / "atlas" / "data" / "layer" / "2.js")
    v = page["heads"]["1"]["heads"]["roles"]
    assert v["roles_sentence"].startswith("Induction head: attends to the token after the previous occurrence")
    assert "0.41 [0.35, 0.47] nats/token" in v["roles_sentence"] and v["confirmed"] == ["induction"]
    row = v["rows"][0]
    assert row["role"] == "induction" and row["score"] == 0.89 and row["control"] == 0.01
    assert row["effect_ci"] == [0.35, 0.47] and row["screen"] == 0.41 and row["confirmed"]
    assert {"text": "Induction head", "target": "role-induction"} in v["links"]
    lab = page["heads"]["1"]["explain"]["label"]
    assert lab["label"].startswith("Induction head:") and lab["facts"][0]["source"] == "heads/roles.json"
    _, page0 = read_page(built / "atlas" / "data" / "layer" / "0.js")
    v0 = page0["heads"]["2"]["heads"]["roles"]
    assert v0["roles_sentence"].startswith("No role confirmed among the 4 tested. Shown by score only: attention sink")
    assert "untested causally" in v0["roles_sentence"]


def test_search_finds_heads_by_role(built):
    _, docs = read_page(built / "atlas" / "data" / "search" / "docs.js")
    heads = {d[1]: d for d in docs["docs"] if d[0] == "head"}
    hits = [k for k, d in heads.items() if all(w in d[4] for w in "confirmed induction".split())]
    assert sorted(hits) == ["2.1", "2.2"]
    assert [k for k, d in heads.items() if "confirmed copying" in d[4]] == ["1.3"]
    assert heads["2.1"][3].startswith("Induction head:")


def test_every_head_read_in_context(built, tiny):
    import torch
    for layer in range(tiny.n_layers):
        _, page = read_page(built / "atlas" / "data" / "layer" / f"{layer}.js")
        for h in range(tiny.n_heads):
            for i, text in enumerate(PROMPTS):
                rc = next(x for x in page["in_context"][str(h)] if x["prompt"] == i)
                pat = torch.tensor(next(p for p in page["patterns"] if p["prompt"] == i)["heads"][str(h)])
                S = pat.shape[0]
                assert len(rc["src"]) == S and rc["src"][0] is None
                for t in range(1, S):
                    s = rc["src"][t]
                    assert 1 <= s <= t and float(pat[t, s]) >= float(pat[t, 1:t + 1].max()) - 1.5e-3
                    assert 1 <= rc["dla_rank_src"][t] <= tiny.d_vocab
                    assert (rc["dla_rank_next"][t] is None) == (s + 1 > t)


def test_roles_stage_output_reads_into_verdicts_and_atlas(tmp_path):
    """The contract from the other side: the heads.roles stage's own roles.json (once that stage is part of
    this build) passes check_roles, every head gets a verdict consistent with the file's grids, and the
    atlas builds with it."""
    pytest.importorskip("headscope.heads.roles")
    import json
    from headscope.heads.options import RolesOptions
    from headscope.heads.verdict import check_roles, run_verdicts
    from headscope.registry import stage
    from headscope.runs import run_stage
    m = tiny_model("gpt2", seed=3)
    run = RunDir(tmp_path / "run", m.identity())
    small = dict(seq_len=32, text_seqs=8, rep_seqs=8, half_len=8, prefix_examples=8, prefix_len=2, prefix_seq_len=32,
                 task_seqs=6, null_draws=16, batch_size=8, confirm_top=2)
    run_stage(m, run, stage("heads.roles"), RolesOptions(**{k: v for k, v in small.items()
                                                            if k in RolesOptions.__dataclass_fields__}), progress=False)
    doc = check_roles(json.loads((run.path / "heads" / "roles.json").read_text()))
    vs = run_verdicts(run.path)
    assert len(vs) == m.n_layers * m.n_heads
    for hk, v in vs.items():
        l, h = map(int, hk.split("."))
        assert all(doc["roles"][r]["confirmed"][l][h] for r in v.confirmed)
        assert v.text.startswith("No role confirmed among") == (not v.confirmed)
        assert "drives" not in v.text and "promotes" not in v.text
    build_atlas(run.path, model=m, examples=PROMPTS[:1], progress=False)
    _, ix = read_page(run.path / "atlas" / "data" / "index.js")
    assert len(ix["role_grid"]) == m.n_layers and set(ix["roles"]) == set(doc["roles"])
