"""The new explain and export commands through the CLI and the stage contract: records, freshness,
one-line errors before anything is written."""

import json

from headscope.cli import main
from headscope.models import load_model
from headscope.runs import RunDir
from headscope.sae.dashboards import run_dashboards
from headscope.sae.options import DashboardOptions, TrainOptions
from headscope.sae.train import run_train

from sae_helpers import small_corpus


def test_feature_commands_record_and_reuse(gpt2_dir, tmp_path, capsys):
    model = load_model(str(gpt2_dir))
    run = RunDir(tmp_path / "run", model.identity())
    run_train(model, run, TrainOptions(layer=1, corpus=small_corpus(tmp_path), n_tokens=8192, batch_size=256,
                                       buffer_tokens=2048, expansion=2, architecture="topk", k=4, seq_len=64),
              progress=False)
    run_dashboards(model, run, DashboardOptions(name="L1", n_tokens=1024, batch_size=4), page_size=16, progress=False)
    base = ["--model", str(gpt2_dir), "--out", str(run.path), "--quiet"]
    assert main(["explain", "features", *base, "--sae", "L1", "--features", "5", "--windows", "100"]) == 0
    out = capsys.readouterr().out
    import re
    m = re.search(r"(\d) features of SAE L1 explained with the statistical backend", out)
    assert m and 2 <= int(m.group(1)) <= 5 and "families (DFA)" in out
    rec = json.loads((run.path / "stages/explain.features.json").read_text())
    assert set(rec["outputs"]) == {"explain/features/L1/contexts.json", "explain/features/L1/explanations_statistical.json"}
    assert main(["explain", "score-features", *base, "--sae", "L1"]) == 0
    out = capsys.readouterr().out
    assert "detection: balanced accuracy" in out and "vs shuffled explanations" in out and "fuzzing:" in out
    assert main(["explain", "score-features", *base, "--sae", "L1"]) == 0
    assert "up to date" in capsys.readouterr().err
    # bad options: one line, exit 2, nothing written
    assert main(["explain", "features", *base]) == 2
    assert "--sae is required" in capsys.readouterr().err
    assert main(["explain", "score-features", *base, "--sae", "L1", "--scorers", "vibes"]) == 2
    assert main(["explain", "label", *base]) == 0
    assert "heads labelled" in capsys.readouterr().out
    to = tmp_path / "repo"
    assert main(["export", "hf", "--out", str(run.path), "--to", str(to), "--sae", "L1"]) == 0
    assert (to / "README.md").is_file() and (to / "blocks.1.attn.hook_z/cfg.json").is_file()


def test_features_dry_run_sends_nothing(gpt2_dir, tmp_path, capsys):
    model = load_model(str(gpt2_dir))
    run = RunDir(tmp_path / "run", model.identity())
    run_train(model, run, TrainOptions(layer=1, corpus=small_corpus(tmp_path), n_tokens=8192, batch_size=256,
                                       buffer_tokens=2048, expansion=2, architecture="topk", k=4, seq_len=64),
              progress=False)
    run_dashboards(model, run, DashboardOptions(name="L1", n_tokens=1024, batch_size=4), page_size=16, progress=False)
    jl = tmp_path / "reqs.jsonl"
    assert main(["explain", "features-dry-run", "--model", str(gpt2_dir), "--out", str(run.path), "--sae", "L1",
                 "--features", "6", "--windows", "100", "--base-url", "http://127.0.0.1:9/v1", "--jsonl", str(jl)]) == 0
    lines = [json.loads(x) for x in jl.read_text().splitlines()]
    # features with nothing to show or test in disjoint documents are skipped
    assert len(lines) >= 2 and f"dry run: {len(lines)} feature explanation requests" in capsys.readouterr().out
    assert all("<<" in x["body"]["messages"][1]["content"] for x in lines)   # activating tokens marked
    assert not (run.path / "explain/features/L1/explanations_openai.json").exists()
