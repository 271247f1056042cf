"""The whole neuron pipeline on a tiny model: stage functions, resume, artifacts, atlas data, the
random baseline comparison, and the CLI with its one-line errors."""

import json

import pytest
import torch

from headscope.cli import main
from headscope.errors import HeadscopeError
from headscope.explain import atlas_data as explain_atlas
from headscope.explain import stages as ex
from headscope.neurons import atlas_data as neuron_atlas
from headscope.neurons import stages as ns
from headscope.runs import RunDir, read_tensors
from headscope.testing.tiny import save_tiny_model, tiny_model

MINE = dict(seq_len=48, top_k=6, top_k_test=6, max_tokens=1200, progress=False)


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    m = tiny_model("llama_gqa")
    run = RunDir(tmp_path_factory.mktemp("run"), m.identity())
    for which in ("top", "random"):
        ns.run_find(m, run, which, per_layer=2, require_space=False, min_chars=1, last_k=2)
        ns.run_mine(m, run, which, **MINE)
        ns.run_attribute(m, run, which, k_sigma=1.0, progress=False)
        ex.run_explain(m, run, "keyword", which, progress=False)
        ex.run_score(m, run, "keyword", which, progress=False)
    ns.run_ablate(m, run, "top", max_pairs=4, progress=False)
    ex.run_compare(m, run, "keyword")
    return m, run


def test_artifacts_shapes_and_consistency(done_run):
    m, run = done_run
    found = json.loads((run / "neurons/find.json").read_text())["neurons"]
    assert len(found) == 4 and {n["layer"] for n in found} == {1, 2}
    mined = json.loads((run / "neurons/mine.json").read_text())["neurons"]
    att = read_tensors(run / "neurons/attribution.safetensors")
    N, P, K = att["A"].shape
    assert (N, K) == (4, m.n_layers * m.n_heads)
    assert P == max(len(n["train"]) + len(n["test"]) for n in mined)
    for i, n in enumerate(mined):
        elig = (n["layer"] + 1) * m.n_heads                       # sequential: same-layer heads count
        rows = att["split"][i] >= 0
        assert (att["split"][i][rows] == torch.tensor([0] * len(n["train"]) + [1] * len(n["test"]), dtype=torch.int8)).all()
        assert not torch.isnan(att["A"][i, rows, :elig]).any() and torch.isnan(att["A"][i, :, elig:]).all()
    pairs = json.loads((run / "neurons/attribution.json").read_text())["pairs"]
    for p in pairs:                                              # every pair is a 25–75 % head
        i, k = p["neuron"], p["layer"] * m.n_heads + p["head"]
        tr = att["split"][i] == 0
        assert 0.25 <= att["active"][i, tr, k].float().mean().item() <= 0.75
    scores = json.loads((run / "explain/scores_keyword.json").read_text())
    assert len(scores["pairs"]) == len(pairs)
    for r in scores["pairs"]:
        if r["E"] is not None:
            assert r["E"] == pytest.approx((r["TPR"] + r["TNR"]) / 2) and 0 <= r["E"] <= 1
            assert r["n_pos"] == sum(r["truth"]) and r["n_neg"] == len(r["truth"]) - r["n_pos"]
    assert (run / "explain/scores_keyword.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "neurons/ablation.png").is_file()
    abl = json.loads((run / "neurons/ablation.json").read_text())
    assert len(abl["pairs"]) == min(4, len(pairs)) and "D" in abl["pooled"]["ks"]
    comp = json.loads((run / "explain/comparison_keyword.json").read_text())
    assert {"top", "random", "mann_whitney", "ks"} <= set(comp)


def test_stages_resume_without_recomputing(done_run, monkeypatch):
    m, run = done_run
    from headscope.neurons import attribution, mining
    boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed"))
    monkeypatch.setattr(mining, "top_sequences", boom)
    monkeypatch.setattr(attribution, "attribute_prompts", boom)
    assert ns.run_mine(m, run, "top", **MINE)["skipped"]
    assert ns.run_attribute(m, run, "top", k_sigma=1.0, progress=False)["skipped"]
    assert ex.run_explain(m, run, "keyword", "top", progress=False)["new"] == 0
    # changed options recompute (here: a different threshold)
    monkeypatch.undo()
    res = ns.run_attribute(m, run, "top", k_sigma=1.5, progress=False)
    assert "skipped" not in res
    ns.run_attribute(m, run, "top", k_sigma=1.0, progress=False)


def test_atlas_data(done_run):
    m, run = done_run
    nd = neuron_atlas.atlas_data(run.path)
    json.dumps(nd, allow_nan=False)
    assert len(nd["neurons"]) == 4
    n0 = next(iter(nd["neurons"].values()))
    assert n0["prompts"] and len(n0["prompts"][0]["tokens"]) == len(n0["prompts"][0]["acts"])
    pairs = json.loads((run / "neurons/attribution.json").read_text())["pairs"]
    assert sum(h["n_neurons"] for h in nd["per_head"].values()) == len(pairs)
    ed = explain_atlas.atlas_data(run.path)
    json.dumps(ed, allow_nan=False)
    assert sum(h["n_explained"] for h in ed["per_head"].values()) == len(pairs)
    assert ed["scores"]["keyword"]["comparison"]["top"]["n"] >= 0
    assert neuron_atlas.atlas_data(run.path / "nothing") is None and explain_atlas.atlas_data(run.path / "x") is None


def test_explain_needs_attribution_first(tmp_path):
    m = tiny_model("gpt2")
    run = RunDir(tmp_path / "r", m.identity())
    with pytest.raises(HeadscopeError, match="run `headscope neurons mine` first"):
        ex.run_explain(m, run, "keyword")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("gpt2", tmp_path_factory.mktemp("tinygpt2"))


def test_cli_pipeline_and_errors(model_dir, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    base = ["--model", str(model_dir), "--out", out]
    assert main(["neurons", "find", *base, "--last-k", "1", "--per-layer", "2", "--no-require-space",
                 "--min-chars", "1"]) == 0
    assert "2 top neurons" in capsys.readouterr().out
    assert main(["neurons", "mine", *base, "--seq-len", "48", "--top-k", "6", "--top-k-test", "4",
                 "--max-tokens", "1000", "--quiet"]) == 0
    assert "train_prompts: 12" in capsys.readouterr().out
    assert main(["neurons", "attribute", *base, "--k-sigma", "1", "--quiet"]) == 0
    assert "pairs: " in capsys.readouterr().out
    # bad input: one line, exit 2
    assert main(["neurons", "find", *base, "--min-chars", "99", "--force"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]   # after the weight-loading progress bar
    assert last.startswith("headscope: error: no neuron") and "try" in last
    monkeypatch.delenv("HEADSCOPE_NO_SUCH_KEY", raising=False)
    assert main(["explain", "run", *base, "--backend", "openai", "--api-key-env", "HEADSCOPE_NO_SUCH_KEY"]) == 2
    assert "missing API key" in capsys.readouterr().err
    assert main(["neurons", "mine", *base, "--top-k-test", "100000", "--force", "--quiet"]) == 2
    assert "too small for the split" in capsys.readouterr().err
