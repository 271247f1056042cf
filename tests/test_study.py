"""`headscope study CONFIG` / `headscope demo`: config checking, stage order, resuming (tiny models)."""

from __future__ import annotations

import json

import pytest

from headscope import study as study_mod
from headscope.errors import HeadscopeError
from headscope.runs import read_json
from headscope.study import STAGES, builtin_config, load_config, plan, run_study
from headscope.testing.tiny import tiny_model

TINY = """
[study]
corpus = "default"
[heads]
n_seqs = 4
half_len = 8
prefix_examples = 4
prefix_lengths = [1, 2]
[atlas]
"""


def write(tmp_path, text, name="s.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("gpt2")


def test_builtin_configs_are_valid_and_use_every_stage():
    for name in ("demo", "ci"):
        cfg = load_config(builtin_config(name))
        p = plan(cfg)
        names = [s.name for s, _, _ in p.steps] + [n for n, _ in p.missing]
        assert names[0] == "heads" and names[-1] == "atlas" and not p.missing
        # every stage of the pipeline has a table in the shipped configs (optional ones disabled)
        tables = {s.name for s in STAGES if study_mod.stage_table(cfg, s.name) is not None}
        assert tables == {s.name for s in STAGES}, {s.name for s in STAGES} - tables
        assert set(tables) - set(names) <= {"explain.baseline"}


@pytest.mark.parametrize("text,msg", [
    ("[heads]\nn_seqs = 4\n[bogus]\n", "unknown table"),
    ("[heads]\nno_such_option = 1\n", "unknown option"),
    ("[study]\nmodle = 'default'\n", "unknown \\[study\\] key"),
    ("[heads\n", "not valid TOML"),
    ("[heads]\nrun = 'os:system'\n", "headscope.module:function"),
    ("heads = 3\n", "unknown table"),
])
def test_bad_configs_fail_before_anything_runs(tmp_path, tiny, text, msg):
    with pytest.raises(HeadscopeError, match=msg):
        cfg = load_config(write(tmp_path, text))
        run_study(cfg, out=tmp_path / "run", model=tiny)
    assert not (tmp_path / "run").exists()


def test_missing_config_file(tmp_path):
    with pytest.raises(HeadscopeError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_needs_checked(tmp_path, tiny):
    cfg = load_config(write(tmp_path, "[neurons.mine]\n"))
    with pytest.raises(HeadscopeError, match="needs 'neurons.find'"):
        run_study(cfg, out=tmp_path / "run", model=tiny)


def test_runs_resumes_and_reruns_on_changed_options(tmp_path, tiny, monkeypatch):
    calls = []
    from headscope.heads import scores
    real = scores.run_head_scores

    def counting(model, run, n_seqs=32, half_len=50, prefix_examples=100, prefix_lengths=(1,), force=None):
        kw = dict(n_seqs=n_seqs, half_len=half_len, prefix_examples=prefix_examples, prefix_lengths=prefix_lengths)
        calls.append(kw if force is None else {**kw, "force": force})
        return real(model, run, progress=False, **kw, force=bool(force))
    monkeypatch.setattr(scores, "run_head_scores", counting)
    out = tmp_path / "run"
    rec = run_study(load_config(write(tmp_path, TINY)), out=out, model=tiny)
    assert len(calls) == 1 and calls[0]["n_seqs"] == 4 and "force" not in calls[0]
    assert set(rec["stages"]) == {"heads", "atlas"}
    assert (out / "heads" / "scores.json").is_file() and (out / "atlas" / "index.html").is_file()
    assert rec["model"]["spec"] == "default" and rec["config"]["heads"]["n_seqs"] == 4
    run_json = read_json(out / "run.json")
    assert {"study.heads", "study.atlas"} <= set(run_json["stages"])
    t_atlas = rec["stages"]["atlas"]["finished"]

    # second run: every stage reused, nothing recomputed
    rec2 = run_study(load_config(write(tmp_path, TINY)), out=out, model=tiny)
    assert len(calls) == 1 and rec2["stages"]["atlas"]["finished"] == t_atlas

    # changed options: that stage reruns (forced past its own cache), and the atlas is rebuilt
    rec3 = run_study(load_config(write(tmp_path, TINY.replace("n_seqs = 4", "n_seqs = 6"))), out=out, model=tiny)
    assert len(calls) == 2 and calls[1]["n_seqs"] == 6 and calls[1]["force"] is True
    assert rec3["stages"]["atlas"]["finished"] > t_atlas
    assert json.loads((out / "heads" / "scores.json").read_text())["config"]["n_seqs"] == 6

    # --force / --only
    run_study(load_config(write(tmp_path, TINY.replace("n_seqs = 4", "n_seqs = 6"))), out=out, model=tiny,
              only=["heads"], force=["heads"])
    assert len(calls) == 3 and calls[2]["force"] is True


def test_stage_that_writes_nothing_is_an_error(tmp_path, tiny, monkeypatch):
    from headscope.heads import scores
    monkeypatch.setattr(scores, "run_head_scores", lambda model, run, **kw: {})
    with pytest.raises(HeadscopeError, match="without writing heads/scores.json"):
        run_study(load_config(write(tmp_path, "[heads]\n")), out=tmp_path / "run", model=tiny)
    assert not read_json(tmp_path / "run" / "run.json")["stages"]


def test_missing_instrument_is_skipped_with_a_note(tmp_path, tiny, capsys):
    text = "[heads]\nrun = 'headscope.not_there.x:run'\n[atlas]\n"
    rec = run_study(load_config(write(tmp_path, text)), out=tmp_path / "run", model=tiny)
    assert set(rec["stages"]) == {"atlas"}
    assert "stage 'heads' skipped" in capsys.readouterr().err


def test_cli_parses(tmp_path):
    from headscope.cli import build_parser
    args = build_parser().parse_args(["study", str(tmp_path / "x.toml"), "--out", "o", "--only", "heads"])
    assert args.func is study_mod.cmd_study and args.only == "heads"
    args = build_parser().parse_args(["demo", "--small"])
    assert args.small and args.func is study_mod.cmd_demo
    from headscope.cli import main
    assert main(["study", str(tmp_path / "x.toml")]) == 2
