"""`headscope study CONFIG` / `headscope demo`: config checking against the options dataclasses, stage order,
reuse while fresh, reruns when options change (tiny models)."""

from __future__ import annotations

import json

import pytest

from headscope import registry
from headscope.errors import HeadscopeError
from headscope.runs import read_json
from headscope.study import builtin_config, load_config, plan, run_study
from headscope.testing.study import tiny_study
from headscope.testing.tiny import tiny_model

TINY = tiny_study("heads.score", study={"corpus": "default"}, tables={"atlas": {}})


def write(tmp_path, text, name="s.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("gpt2")


def test_builtin_configs_are_valid_and_use_every_stage():
    every = [s.name for s in registry.stages()]
    for name in ("demo", "ci"):
        cfg = load_config(builtin_config(name))
        p = plan(cfg)
        names = [s.name for s, _ in p.steps]
        assert names == [n for n in every if n in names], "stages run in registry order"
        assert names[0] == "heads.score" and p.atlas is not None
        # every stage has a table in the shipped configs, but importing a pretrained SAE and (in CI) the baseline
        assert set(every) - set(names) <= {"explain.baseline", "sae.import"}, set(every) - set(names)


@pytest.mark.parametrize("text,msg", [
    ("[heads.score]\nn_seqs = 4\n[bogus]\n", "unknown table \\[bogus\\]"),
    ("[heads.score]\nno_such_option = 1\n", "\\[heads.score\\]: unknown option\\(s\\) no_such_option"),
    ("[heads.score]\nn_seqs = \"two\"\n", "\\[heads.score\\] n_seqs = 'two': expected int"),
    ("[heads.score]\nn_seqs = 2.5\n", "expected int"),
    ("[heads.score]\nn_seqs = 0\n", "--n-seqs must be at least 1"),
    ("[lens.train]\nkind = \"cubic\"\n", "choose from 'affine', 'lowrank', 'full'"),
    ("[heads.nope]\n", "\\[heads.nope\\] is no stage"),
    ("[sae]\nname = \"L1\"\nbogus = 3\n[sae.eval]\n", "\\[sae\\] key\\(s\\) bogus"),
    ("[study]\nmodle = 'default'\n", "unknown \\[study\\] key"),
    ("[heads\n", "not valid TOML"),
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


def test_shared_instrument_keys_reach_every_stage():
    cfg = {"sae": {"name": "X", "train": {"layer": 1}, "eval": {}}, "study": {"corpus": "c.txt"}}
    p = plan(cfg)
    opts = {s.name: o for s, o in p.steps}
    assert opts["sae.train"].name == "X" and opts["sae.eval"].name == "X"
    assert opts["sae.train"].corpus == "c.txt" and opts["sae.eval"].corpus == "c.txt"


def test_missing_input_names_the_stage_that_makes_it(tmp_path, tiny):
    cfg = load_config(write(tmp_path, "[neurons.mine]\n"))
    with pytest.raises(HeadscopeError, match="neurons/find.json, which is missing: run `headscope neurons find`"):
        run_study(cfg, out=tmp_path / "run", model=tiny)


def test_runs_reuses_and_reruns_on_changed_options(tmp_path, tiny, monkeypatch):
    calls = []
    from headscope.heads import scores
    real = scores.run_head_scores

    def counting(model, run, opts, progress=True):
        calls.append(opts)
        return real(model, run, opts, progress=False)
    monkeypatch.setattr(scores, "run_head_scores", counting)
    out = tmp_path / "run"
    rec = run_study(load_config(write(tmp_path, TINY)), out=out, model=tiny)
    assert len(calls) == 1 and calls[0].n_seqs == 4
    assert set(rec["stages"]) == {"heads.score", "atlas"}
    assert (out / "heads" / "scores.json").is_file() and (out / "atlas" / "index.html").is_file()
    assert rec["model"]["spec"] == "default" and rec["config"]["heads"]["score"]["n_seqs"] == 4
    assert read_json(out / "stages" / "heads.score.json")["options"]["n_seqs"] == 4
    t_atlas = rec["stages"]["atlas"]["finished"]

    # second run: every stage reused, nothing recomputed, the atlas not rebuilt
    rec2 = run_study(load_config(write(tmp_path, TINY)), out=out, model=tiny)
    assert len(calls) == 1 and rec2["stages"]["atlas"]["finished"] == t_atlas

    # changed options: that stage reruns and the atlas is rebuilt
    rec3 = run_study(load_config(write(tmp_path, TINY.replace("n_seqs = 4", "n_seqs = 6"))), out=out, model=tiny)
    assert len(calls) == 2 and calls[1].n_seqs == 6
    assert rec3["stages"]["atlas"]["finished"] > t_atlas
    assert json.loads((out / "heads" / "scores.json").read_text())["config"]["n_seqs"] == 6

    # an artifact deleted by hand: the stage is no longer fresh
    (out / "heads" / "scores.safetensors").unlink()
    run_study(load_config(write(tmp_path, TINY.replace("n_seqs = 4", "n_seqs = 6"))), out=out, model=tiny)
    assert len(calls) == 3 and (out / "heads" / "scores.safetensors").is_file()

    # --force / --only
    run_study(load_config(write(tmp_path, TINY.replace("n_seqs = 4", "n_seqs = 6"))), out=out, model=tiny,
              only=["heads.score"], force=["heads.score"])
    assert len(calls) == 4


def test_stage_that_writes_nothing_is_an_error(tmp_path, tiny, monkeypatch):
    from headscope.heads import instrument
    from headscope.heads.results import HeadScoresResult
    monkeypatch.setattr(instrument, "stage_score", lambda model, run, opts, progress=True:
                        HeadScoresResult(n_layers=3, n_heads=4, layers=[0], top={}))   # typed, but writes nothing
    with pytest.raises(HeadscopeError, match="without writing"):
        run_study(load_config(write(tmp_path, "[heads.score]\n")), out=tmp_path / "run", model=tiny)
    assert not (tmp_path / "run" / "stages" / "heads.score.json").exists()


@pytest.mark.parametrize("refresh", [None, "stage"])
def test_atlas_built_at_the_end_or_after_each_stage(tmp_path, tiny, monkeypatch, refresh):
    from headscope import study
    seen = []
    monkeypatch.setattr(study, "_refresh_atlas", lambda run, model, opts: seen.append(
        sorted(p.name for p in (run.path / "stages").glob("*.json"))))
    text = TINY + "[sae]\nname='L1'\n[sae.train]\nlayer = 1\nn_tokens = 512\nbatch_size = 64\nbuffer_tokens = 256\n" \
                  "expansion = 1\nk = 2\nseq_len = 32\n"
    if refresh:
        text = text.replace("[study]\n", f"[study]\nrefresh_atlas = '{refresh}'\n")
    rec = run_study(load_config(write(tmp_path, text)), out=tmp_path / "run", model=tiny, progress=False)
    assert rec["wall_seconds"] >= sum(st["seconds"] for st in rec["stages"].values()) - 0.1
    end = ["heads.score.json", "sae.train.json"]
    # default: once, at the end; "stage": also after heads.score, while the SAE still trains
    assert seen == ([["heads.score.json"], end] if refresh == "stage" else [end])


def test_refresh_atlas_checked(tmp_path):
    with pytest.raises(HeadscopeError, match="refresh_atlas"):
        load_config(write(tmp_path, "[study]\nrefresh_atlas = 'often'\n"))


def test_cli_parses(tmp_path):
    from headscope import study as study_mod
    from headscope.cli import build_parser, main
    args = build_parser().parse_args(["study", str(tmp_path / "x.toml"), "--out", "o", "--only", "heads.score"])
    assert args.func is study_mod.cmd_study and args.only == "heads.score"
    args = build_parser().parse_args(["demo", "--small"])
    assert args.small and args.func is study_mod.cmd_demo
    assert main(["study", str(tmp_path / "x.toml")]) == 2


def test_stage_that_returns_other_than_its_result_is_an_error(tmp_path, tiny, monkeypatch):
    """A registered stage that returns a bare dict instead of its declared typed result is an error (issue 22),
    and leaves no record."""
    from headscope.heads import instrument
    monkeypatch.setattr(instrument, "stage_score", lambda model, run, opts, progress=True: {"n_layers": 3})
    with pytest.raises(HeadscopeError, match="returned a dict, not its declared HeadScoresResult"):
        run_study(load_config(write(tmp_path, "[heads.score]\n")), out=tmp_path / "run", model=tiny)
    assert not (tmp_path / "run" / "stages" / "heads.score.json").exists()
