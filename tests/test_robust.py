"""Issue 23's faults that a table row cannot hold: nothing written outside the run (SAE names, export
targets and their temporary folders), partial output removed after a full disk, a run directory's temporary
leftovers cleaned at the next stage start (unless another process holds the run), and the CLI's stderr one
line in a real process (library progress bars and load reports silenced)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import headscope.runs as runs
from headscope.cli import main
from headscope.errors import HeadscopeError
from headscope.options import check_name
from headscope.runs import RunDir, Stage, run_stage, write_json
from headscope.testing.tiny import save_tiny_model, tiny_model

from sae_helpers import small_corpus


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("llama_gqa", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def sae_run(tmp_path_factory):
    from headscope.sae.options import DashboardOptions, TrainOptions
    from headscope.sae.train import run_train
    tmp = tmp_path_factory.mktemp("sae")
    model = tiny_model("gpt2")
    run = RunDir(tmp / "run", model.identity())
    run_train(model, run, TrainOptions(layer=1, corpus=small_corpus(tmp), n_tokens=2048, batch_size=256,
                                       buffer_tokens=1024, expansion=1, architecture="topk", k=4, seq_len=64),
              progress=False)
    from headscope.sae.dashboards import run_dashboards
    run_dashboards(model, run, DashboardOptions(name="L1", n_tokens=512, batch_size=4), page_size=16, progress=False)
    return run


def test_names_that_become_paths():
    for ok in ("L1", "my-sae_2", "x.y"):
        check_name(ok, "--name")
    for bad in ("..", "../x", "a/b", ".hidden", "", "x\\y", "a\nb", "x.tmp", "x.staging-1", "x" * 300):
        with pytest.raises(HeadscopeError, match="not a plain folder name"):
            check_name(bad, "--name")


@dataclass(frozen=True)
class EscapeOptions:
    rel: str = "../escaped.json"


def escape(model, run, opts, progress=True):
    write_json(run / opts.rel, {"x": 1})
    return {}


def test_stage_paths_stay_inside_the_run(tmp_path):
    """Whatever a stage declares (a name from a config), it cannot write or read outside its run."""
    run = RunDir(tmp_path / "run", tiny_model("gpt2").identity())
    for rel in ("../escaped.json", "/tmp/escaped.json", "a/../../escaped.json"):
        st = Stage("t.escape", EscapeOptions, f"{__name__}:escape", writes=lambda o: [o.rel])
        with pytest.raises(HeadscopeError, match="would leave the run directory"):
            run_stage(None, run, st, EscapeOptions(rel))
        st = Stage("t.escape", EscapeOptions, f"{__name__}:escape", reads=lambda o: [o.rel])
        with pytest.raises(HeadscopeError, match="would leave the run directory"):
            run_stage(None, run, st, EscapeOptions(rel))
    assert _files(tmp_path) == {"run", "run/run.json", "run/.run.lock"}


def test_sae_name_escape_writes_nothing(tmp_path, model_dir, capsys):
    """Issue 23 (1): `sae train --name ../../escaped` exited 0 and wrote beside the run."""
    rc = main(["sae", "train", "--model", str(model_dir), "--out", str(tmp_path / "a" / "run"), "--layer", "1",
               "--tokens", "512", "--name", "../../escaped", "--quiet"])
    assert rc == 2 and "not a plain folder name" in capsys.readouterr().err
    assert _files(tmp_path) == set()


def test_export_hf_never_touches_an_existing_user_path(sae_run, tmp_path, capsys):
    """Issue 23 (2): `DIR/repo.tmp` (a user's folder, or a file) survives an export to `DIR/repo`; the
    repository is built in a new, uniquely named folder and renamed into place."""
    for kind in ("folder", "file"):
        d = tmp_path / kind
        d.mkdir()
        if kind == "folder":
            (d / "repo.tmp").mkdir()
            (d / "repo.tmp" / "important.txt").write_text("keep me")
        else:
            (d / "repo.tmp").write_text("keep me too")
        before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
        rc = main(["export", "hf", "--out", str(sae_run.path), "--sae", "L1", "--to", str(d / "repo")])
        assert rc == 0, capsys.readouterr().err
        assert {p: p.read_bytes() for p in before} == before
        assert sorted(p.name for p in d.iterdir()) == ["repo", "repo.tmp"]
        assert (d / "repo" / "README.md").is_file()


def test_export_that_fails_leaves_nothing(sae_run, tmp_path, monkeypatch, capsys):
    """A full disk half-way: one line, no temporary folder, no parent folder it created."""
    import shutil
    real = shutil.copy2
    calls = {"n": 0}

    def full(src, dst, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, **k)
    monkeypatch.setattr(shutil, "copy2", full)
    capsys.readouterr()
    rc = main(["export", "hf", "--out", str(sae_run.path), "--sae", "L1", "--to", str(tmp_path / "new" / "deep" / "repo")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert _files(tmp_path) == set()


def test_full_disk_in_a_stage_removes_its_partial_output(tmp_path, model_dir, monkeypatch, capsys):
    """Issue 23: ENOSPC in `heads score` left scores.safetensors and the figures with no stage record. Now:
    one line, and the run directory it created is gone; in an existing run, what it wrote is removed and
    what was there before stays."""
    from headscope.heads import scores

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    cmd = ["heads", "score", "--model", str(model_dir), "--n-seqs", "2", "--half-len", "8", "--prefix-examples", "2",
           "--prefix-lengths", "1", "--quiet"]
    monkeypatch.setattr(scores, "write_json", full)
    capsys.readouterr()
    assert main(cmd + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "partial output was removed" in err[0], err
    assert not (tmp_path / "run").exists()
    monkeypatch.undo()
    assert main(["lens", "train", "--model", str(model_dir), "--out", str(tmp_path / "r2"), "--layers", "2",
                 "--tokens", "0", "--init-tokens", "256", "--seq-len", "32", "--batch-size", "2", "--quiet"]) == 0
    before = _files(tmp_path / "r2")
    monkeypatch.setattr(scores, "write_json", full)
    assert main(cmd + ["--out", str(tmp_path / "r2")]) == 2
    assert _files(tmp_path / "r2") == before


def test_leftovers_are_cleaned_at_the_next_stage_start(tmp_path, model_dir):
    """Issue 23: `heads/prev_token.png.<rand>.tmp.png` and `.atlas.tmp.<rand>/` outlived a kill and a
    successful rerun. They go at the next stage start — unless another process holds the run (its
    temporary files are live then)."""
    out = tmp_path / "run"
    cmd = ["heads", "score", "--model", str(model_dir), "--out", str(out), "--n-seqs", "2", "--half-len", "8",
           "--prefix-examples", "0", "--quiet"]
    assert main(cmd) == 0
    left = [out / "heads" / "prev_token.png.k2j3h4.tmp.png", out / "heads" / "scores.json.abc123.tmp",
            out / ".atlas.tmp.x7y8z9" / "index.html", out / "lens.staging-q1w2e3" / "lenses.json",
            out / "atlas.old-1234abcd" / "index.html"]
    for p in left:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("half")
    keep = out / "heads" / "notes.txt"
    keep.write_text("a user's file")
    with open(out / ".run.lock", "a+b") as f:  # another process holds the run: nothing is touched
        import fcntl
        fcntl.flock(f, fcntl.LOCK_SH)
        assert main(cmd + ["--force"]) == 0
        assert all(p.exists() for p in left)
    assert main(cmd + ["--force"]) == 0
    assert not any(p.exists() for p in left) and not (out / ".atlas.tmp.x7y8z9").exists()
    assert keep.read_text() == "a user's file"


def test_atlas_build_full_disk_keeps_the_old_atlas(tmp_path, monkeypatch, capsys):
    from headscope.atlas import build
    run = RunDir(tmp_path / "run", tiny_model("gpt2").identity())
    build.build_atlas(run.path, progress=False)
    index = (run.path / "atlas" / "index.html").read_bytes()
    real = os.replace

    def full(src, dst):
        if str(dst).endswith("/atlas") and Path(src).name.startswith(".atlas.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst)
    monkeypatch.setattr(build.os, "replace", full)
    capsys.readouterr()
    assert main(["atlas", "build", str(run.path), "--no-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # (its progress bars ran before the disk filled up)
    assert err[-1].startswith("headscope: error: ") and "No space left on device" in err[-1], err
    assert "Traceback" not in "\n".join(err)
    monkeypatch.undo()
    assert (run.path / "atlas" / "index.html").read_bytes() == index
    assert not [p for p in run.path.iterdir() if p.name.startswith(".atlas.")]


def test_cli_error_is_one_line_in_a_real_process(tmp_path, model_dir):
    """The tests turn transformers' bars off in-process; a user's shell does not. In a fresh process an
    error after the model loaded (a layer out of range, a bad device) is still exactly one stderr line."""
    env = {**os.environ, "PYTHONPATH": str(Path(runs.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        env.pop(key, None)
    for extra, match in ((["--layers", "99"], "layer 99 is out of range"),
                         (["--device", "meta"], "--device 'meta'")):
        p = subprocess.run([sys.executable, "-m", "headscope.cli", "heads", "score", "--model", str(model_dir),
                            "--out", str(tmp_path / "run"), *extra], env=env, capture_output=True, text=True,
                           timeout=300)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert p.returncode == 2 and len(lines) == 1 and match in lines[0], p.stderr[-2000:]
        assert not (tmp_path / "run").exists()


def test_neuronpedia_export_to_an_unwritable_place_is_one_line(sae_run, tmp_path, capsys):
    """Issue 23: `export neuronpedia --to` a /proc path or below a file was a traceback."""
    (tmp_path / "file").write_text("x")
    for to in ("/proc/headscope-np", str(tmp_path / "file" / "np")):
        capsys.readouterr()
        rc = main(["export", "neuronpedia", "--out", str(sae_run.path), "--sae", "L1", "--to", to])
        err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
        assert rc == 2 and len(err) == 1 and "cannot write" in err[0], err
    for bad in ("../../x", "a/../.."):
        rc = main(["export", "neuronpedia", "--out", str(sae_run.path), "--sae", "L1", "--to", str(tmp_path / "np"),
                   "--model-id", bad])
        assert rc == 2
    assert _files(tmp_path) == {"file"}
    assert main(["export", "neuronpedia", "--out", str(sae_run.path), "--sae", "L1", "--to", str(tmp_path / "np")]) == 0
    assert not [p for p in (tmp_path / "np").rglob("*") if ".tmp" in p.name]
