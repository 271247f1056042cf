"""The stage functions end to end on a tiny model (train → eval → analysis → dashboards → atlas
data), and the CLI on a tiny model saved as an HF directory."""

import json

import pytest

from headscope.cli import main
from headscope.runs import RunDir, read_json, read_tensors
from headscope.sae.analysis import run_analysis
from headscope.sae.atlas_data import atlas_data
from headscope.sae.dashboards import run_dashboards
from headscope.sae.evaluate import run_eval
from headscope.sae.options import AnalysisOptions, DashboardOptions, EvalOptions, TrainOptions
from headscope.sae.train import run_train
from headscope.testing.tiny import tiny_model

from sae_helpers import small_corpus


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "batchtopk", "matryoshka_batchtopk"])
def test_stage_functions_and_atlas_data(tmp_path, arch):
    """Every trainable architecture goes through the same evaluation, analysis, dashboards and atlas."""
    model = tiny_model("gpt2")
    run = RunDir(tmp_path / "run", model.identity())
    opts = dict(corpus=small_corpus(tmp_path), n_tokens=8192, batch_size=256, buffer_tokens=2048, expansion=2,
                architecture=arch, k=4, seq_len=64, l0_coeff=0.05)
    run_train(model, run, TrainOptions(layer=1, **opts), progress=False)
    ev = run_eval(model, run, EvalOptions(name="L1", n_tokens=512, batch_size=4), progress=False)
    for key in ("l0", "fve", "ce_recovered_zero", "ce_recovered_mean", "kl_recovered_zero", "dead_frac", "dense_frac"):
        assert key in ev
    assert ev["l0"] <= 4 if arch == "topk" else 0 < ev["l0"] < 64
    sp = read_tensors(tmp_path / "run/sae/L1/sparsity.safetensors")["sparsity"]
    assert sp.shape == (64,) and (sp <= 0).all()
    assert (tmp_path / "run/sae/L1/eval_density.png").stat().st_size > 1000
    run_analysis(model, run, AnalysisOptions(name="L1", n_null=50), progress=False)
    an = read_json(tmp_path / "run/sae/L1/heads.json")
    assert set(an["heads"]) == {"0", "1", "2", "3"}
    assert all(h["n_groups"] == len(h["groups"]) and h["verdict"] for h in an["heads"].values())
    idx = run_dashboards(model, run, DashboardOptions(name="L1", n_tokens=512, batch_size=4), page_size=16,
                                                      progress=False)
    assert idx["alive"] == int((read_tensors(tmp_path / "run/sae/L1/feature_counts.safetensors")["counts"] > 0).sum()) \
        or idx["alive"] > 0
    page = read_json(tmp_path / "run/sae/L1/dashboards/page_000.json")["features"]
    rec = next(iter(page.values()))
    ex = rec["examples"][0]
    assert ex["context"][ex["index"]] and ex["acts"][ex["index"]] == pytest.approx(ex["act"], abs=1e-2)
    assert ex["act"] == pytest.approx(rec["max_act"], abs=1e-3)
    acts = [e["act"] for e in rec["examples"]]
    assert acts == sorted(acts, reverse=True)
    assert len(rec["logits"]["top"]) == 10 and len(rec["head_attribution"]) == 4
    assert rec["dfa"]["dest"] == ex["pos"] and len(rec["dfa"]["per_head"]) == 4
    data = atlas_data(tmp_path / "run")
    json.dumps(data)
    assert set(data["per_head"]) == {"1.0", "1.1", "1.2", "1.3"}
    assert data["saes"][0]["eval"]["l0"] == pytest.approx(ev["l0"])
    assert data["feature_pages"]["L1"]["pages"] == idx["pages"]
    assert atlas_data(tmp_path / "nothing") == {"per_head": {}, "saes": [], "feature_pages": {}}


def test_cli_train_eval_dfa_and_errors(tmp_path, capsys):
    model = tiny_model("qwen2")
    mdir = tmp_path / "tinymodel"
    model.hf.save_pretrained(mdir)
    model.tokenizer.save_pretrained(mdir)
    corpus = small_corpus(tmp_path)
    out = str(tmp_path / "run")
    base = ["--model", str(mdir), "--out", out]
    assert main(["sae", "train", *base, "--layer", "2", "--corpus", corpus, "--tokens", "4096", "--batch-size", "256",
                 "--buffer-tokens", "2048", "--expansion", "2", "--k", "4"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["name"] == "L2" and res["final"]["l0"] <= 4
    assert main(["sae", "dfa", *base, "--name", "L2", "--feature", "1", "--prompt", "The value of x is",
                 "--recursive"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["sources"][0]["pos"] == 0 and len(d["sources"]) == d["dest"] + 1 and d["recursive"]
    assert main(["sae", "eval", *base, "--name", "nope"]) == 2
    assert "sae/nope/cfg.json, which is missing" in capsys.readouterr().err
    assert main(["sae", "train", *base, "--layer", "9", "--corpus", corpus]) == 2
    assert "layer 9 is out of range" in capsys.readouterr().err
    assert main(["sae", "train", *base, "--layer", "1", "--cache", str(tmp_path / "void")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sweep_trains_from_one_cache_and_plots(tmp_path, capsys):
    """`headscope sae sweep` end to end (the command takes its options dataclass), then a grid of
    architectures through :func:`run_sweep` from the cache the first sweep wrote."""
    from headscope.errors import HeadscopeError
    from headscope.sae.options import SweepOptions
    from headscope.sae.sweep import run_sweep
    from headscope.testing.tiny import save_tiny_model
    mdir = save_tiny_model("neox_sequential", tmp_path / "tinymodel")
    corpus = small_corpus(tmp_path)
    assert main(["sae", "sweep", "--model", str(mdir), "--out", str(tmp_path / "run"), "--layer", "1",
                 "--values", "2", "6", "--eval-tokens", "256", "--corpus", corpus, "--tokens", "4096",
                 "--batch-size", "256", "--expansion", "2", "--seq-len", "64", "--buffer-tokens", "2048",
                 "--warmup-steps", "5"]) == 0
    points = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in points] == ["L1_k2", "L1_k6"]
    assert points[0]["l0"] <= 2 < points[1]["l0"] <= 6
    assert (tmp_path / "run/sae/sweep_L1/sweep.png").stat().st_size > 1000
    assert (tmp_path / "run/sae/sweep_L1/cache/manifest.json").is_file()
    cfg = read_json(tmp_path / "run/sae/L1_k6/train.json")["config"]
    assert (cfg["k"], cfg["warmup_steps"], cfg["lr"]) == (6, 5, 1e-3)
    assert read_json(tmp_path / "run/sae/sweep_L1/cache/manifest.json")["tokens_per_shard"] <= 2048
    model = tiny_model("neox_sequential")
    run = RunDir(tmp_path / "run", model.identity())
    cache = str(tmp_path / "run/sae/sweep_L1/cache")
    with pytest.raises(HeadscopeError, match="positive integers"):
        run_sweep(model, run, SweepOptions(layer=1, values=[2.5], cache=cache), progress=False)
    # several architectures from the same cache: one point per (architecture, value), one curve each
    res = run_sweep(model, run, SweepOptions(layer=1, grid="topk:2 batchtopk:2 jumprelu:0.5 matryoshka_batchtopk:3",
                                             eval_tokens=256, cache=cache, corpus=corpus, n_tokens=4096,
                                             batch_size=256, expansion=2, seq_len=64), progress=False)
    assert [p["name"] for p in res["points"]] == ["L1_k2", "L1_btk2", "L1_l0_0.5", "L1_mtk3"]
    assert [p["architecture"] for p in res["points"]] == ["topk", "batchtopk", "jumprelu", "matryoshka_batchtopk"]
    assert all(p["ce_recovered_zero"] is not None and p["l0"] > 0 for p in res["points"])
    assert read_json(tmp_path / "run/sae/sweep_L1/sweep.json")["architectures"] == res["architectures"]
    from headscope.sae.options import parse_grid
    assert parse_grid("topk:8,16 jumprelu:0.5") == {"topk": [8.0, 16.0], "jumprelu": [0.5]}
    with pytest.raises(HeadscopeError, match="not ARCH:V1,V2"):
        parse_grid("gated:1")
