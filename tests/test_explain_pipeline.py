"""explain run/score through the OpenAI-compatible backend against a local server: a failing endpoint
keeps finished work, a rerun resumes (cache + saved pairs), scoring reads Yes/No answers."""

import json

import pytest

from headscope.errors import HeadscopeError
from headscope.explain import stages as ex
from headscope.explain.options import DryRunOptions, RunOptions, ScoreOptions
from headscope.explain.results import ExplainRunResult
from headscope.neurons import stages as ns
from headscope.neurons.options import AttributeOptions, FindOptions, MineOptions
from headscope.runs import RunDir
from headscope.testing.tiny import tiny_model
from test_explain_client import Server


@pytest.fixture(scope="module")
def attributed(tmp_path_factory):
    m = tiny_model("llama_gqa")
    run = RunDir(tmp_path_factory.mktemp("run"), m.identity())
    ns.run_find(m, run, FindOptions(per_layer=2, require_space=False, min_chars=1, last_k=2))
    ns.run_mine(m, run, MineOptions(seq_len=48, top_k=6, top_k_test=12, max_tokens=1200), progress=False)
    ns.run_attribute(m, run, AttributeOptions(k_sigma=1.0), progress=False)
    n_pairs = len(json.loads((run / "neurons/attribution.json").read_text())["pairs"])
    assert n_pairs >= 3
    return m, run, n_pairs


def test_endpoint_failure_keeps_finished_work_and_rerun_resumes(attributed):
    m, run, n_pairs = attributed
    server = Server()
    try:
        server.script = [("ok", "Explanation one."), ("ok", "Explanation two.")]
        server.default = ("status", 500)
        opts = {"backend": "openai", "base_url": server.url, "llm": "m", "max_retries": 1, "backoff": 0.01,
                "concurrency": 1}
        with pytest.raises(HeadscopeError, match="failed after 2 attempts: HTTP 500"):
            ex.run_explain(m, run, RunOptions(**opts), chunk=1, progress=False)
        saved = json.loads((run / "explain/explanations_openai.json").read_text())["pairs"]
        assert [p["explanation"] for p in saved] == ["Explanation one.", "Explanation two."]
        sent = len(server.requests)
        server.default = ("ok", "Later explanation.")
        res = ex.run_explain(m, run, RunOptions(**opts), chunk=1, resume=True, progress=False)
        assert res == ExplainRunResult(pairs=n_pairs, new=n_pairs - 2, backend="openai")
        new_bodies = [json.dumps(r["body"], sort_keys=True) for r in server.requests[sent:]]
        old_ok = [json.dumps(r["body"], sort_keys=True) for r in server.requests[:2]]
        assert len(new_bodies) == len(set(new_bodies))            # each request sent once (cache)
        assert not set(new_bodies) & set(old_ok)                  # nothing finished is sent again
        assert 1 <= len(new_bodies) <= n_pairs - 2
        server.default = ("ok", "Yes")
        s = ex.run_score(m, run, ScoreOptions(**opts, max_per_class=6, min_per_class=2), progress=False)
        scores = json.loads((run / "explain/scores_openai.json").read_text())["pairs"]
        scored = [r for r in scores if r["E"] is not None]
        assert scored and s.pairs == n_pairs
        for r in scored:                                # always Yes on balanced prompts: TPR 1, TNR 0, E = ½
            assert r["TPR"] == 1.0 and r["TNR"] == 0.0 and r["E"] == 0.5 and not r["significant"]
            assert r["E_control"] == 0.5                # the shuffled-explanation control is chance too
    finally:
        server.close()


def test_dry_run_estimates_tokens(attributed, tmp_path):
    m, run, n_pairs = attributed
    out = tmp_path / "req.jsonl"
    res = ex.dry_run_estimate(m, run, DryRunOptions(backend="openai", jsonl=str(out)))
    assert res["explain_requests"] == n_pairs == len(out.read_text().splitlines())
    assert res["explain_input_tokens"] > 0 and res["score_requests"] > 0
