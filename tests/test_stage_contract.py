"""The stage contract (runs.run_stage): a stage is reused only while its options and every artifact it read
and wrote are unchanged; otherwise it and everything downstream reruns — from the CLI as from a study.
The three stale-result scenarios of issue 11 run end to end on tiny models through the CLI."""

from __future__ import annotations

import json
import multiprocessing as mp
from dataclasses import dataclass

import pytest

from headscope.cli import main
from headscope.errors import HeadscopeError
from headscope.runs import RunDir, Stage, read_json, run_stage, update_json, write_json
from headscope.testing.tiny import save_tiny_model, tiny_model

CALLS: list[str] = []


@dataclass(frozen=True)
class UpOptions:
    value: int = 1


@dataclass(frozen=True)
class DownOptions:
    scale: int = 10


def up(model, run, opts: UpOptions, progress=True):
    CALLS.append("up")
    write_json(run / "up.json", {"value": opts.value})
    return {"value": opts.value}


def down(model, run, opts: DownOptions, progress=True):
    CALLS.append("down")
    write_json(run / "down.json", {"value": read_json(run / "up.json")["value"] * opts.scale})
    return {}


UP = Stage("t.up", UpOptions, f"{__name__}:up", writes=lambda o: ["up.json"])
DOWN = Stage("t.down", DownOptions, f"{__name__}:down", reads=lambda o: ["up.json"], writes=lambda o: ["down.json"])


@pytest.fixture()
def run(tmp_path):
    CALLS.clear()
    return RunDir(tmp_path / "run", tiny_model("gpt2").identity())


def test_fresh_stage_is_reused_and_changes_propagate_downstream(run):
    assert run_stage(None, run, UP, UpOptions(1))[1] and run_stage(None, run, DOWN, DownOptions())[1]
    assert CALLS == ["up", "down"]
    assert not run_stage(None, run, UP, UpOptions(1))[1] and not run_stage(None, run, DOWN, DownOptions())[1]
    assert CALLS == ["up", "down"]
    # upstream options change: upstream reruns, and downstream is stale because its input changed
    run_stage(None, run, UP, UpOptions(2))
    assert run.record("t.down") and "down.json" in run.record("t.down")["outputs"]
    _, ran = run_stage(None, run, DOWN, DownOptions())
    assert ran and read_json(run / "down.json")["value"] == 20
    assert run.record("t.down")["why"] == "input changed: up.json"
    # upstream reruns with the same options and writes the same bytes: downstream stays fresh
    run_stage(None, run, UP, UpOptions(2), force=True)
    assert not run_stage(None, run, DOWN, DownOptions())[1]


def test_edited_or_missing_output_and_force_rerun(run):
    run_stage(None, run, UP, UpOptions(1))
    write_json(run / "up.json", {"value": 99})            # edited by hand
    assert run_stage(None, run, UP, UpOptions(1))[1] and read_json(run / "up.json")["value"] == 1
    (run / "up.json").unlink()                             # deleted by hand
    assert run_stage(None, run, UP, UpOptions(1))[1]
    assert run_stage(None, run, UP, UpOptions(1), force=True)[1]
    assert CALLS == ["up"] * 4


def test_missing_input_is_a_one_line_error_naming_its_maker(run):
    with pytest.raises(HeadscopeError, match="t.down needs .*up.json, which is missing: run `headscope t up` first"):
        run_stage(None, run, DOWN, DownOptions(), writer_of=lambda rel: "t.up")
    assert CALLS == []


def _bump(path, n):
    for _ in range(n):
        update_json(path, lambda d: d.__setitem__("n", d.get("n", 0) + 1))


def test_concurrent_json_updates_lose_nothing(tmp_path):
    path = tmp_path / "study.json"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_bump, args=(path, 150)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert read_json(path)["n"] == 600


# ---- the stale scenarios of issue 11, through the CLI --------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("llama_gqa", tmp_path_factory.mktemp("tinyllama"))


def test_lens_eval_reruns_when_lenses_change(tmp_path, model_dir):
    base = ["--model", str(model_dir), "--out", str(tmp_path / "run"), "--quiet"]
    small = ["--tokens", "0", "--init-tokens", "256", "--seq-len", "32", "--batch-size", "2"]
    assert main(["lens", "train", *base, "--layers", "2", *small]) == 0
    assert main(["lens", "eval", *base, "--tokens", "128", "--transfer-tokens", "0"]) == 0
    assert set(read_json(tmp_path / "run/lens/eval.json")["per_head"]) == {f"2.{h}" for h in range(4)}
    assert main(["lens", "train", *base, "--layers", "0", *small]) == 0
    assert main(["lens", "eval", *base, "--tokens", "128", "--transfer-tokens", "0"]) == 0
    assert set(read_json(tmp_path / "run/lens/eval.json")["per_head"]) == {f"0.{h}" for h in range(4)}


def test_sae_retrains_when_k_changes(tmp_path, model_dir):
    base = ["--model", str(model_dir), "--out", str(tmp_path / "run"), "--quiet"]
    small = ["--layer", "1", "--tokens", "512", "--batch-size", "64", "--buffer-tokens", "256", "--expansion", "1",
             "--seq-len", "32"]
    assert main(["sae", "train", *base, *small, "--k", "2"]) == 0
    assert main(["sae", "eval", *base, "--name", "L1", "--tokens", "64"]) == 0
    assert read_json(tmp_path / "run/sae/L1/cfg.json")["k"] == 2
    assert main(["sae", "train", *base, *small, "--k", "3"]) == 0
    assert read_json(tmp_path / "run/sae/L1/cfg.json")["k"] == 3
    assert main(["sae", "eval", *base, "--name", "L1", "--tokens", "64"]) == 0
    assert read_json(tmp_path / "run/stages/sae.eval.json")["why"].startswith("input changed")


def test_neurons_attribute_reruns_after_mine(tmp_path, model_dir):
    base = ["--model", str(model_dir), "--out", str(tmp_path / "run"), "--quiet"]
    assert main(["neurons", "find", *base, "--last-k", "1", "--per-layer", "2", "--no-require-space",
                 "--min-chars", "1"]) == 0
    mine = ["neurons", "mine", *base, "--seq-len", "48", "--top-k", "6", "--top-k-test", "4", "--max-tokens", "1000"]
    assert main(mine) == 0
    assert main(["neurons", "attribute", *base, "--k-sigma", "1"]) == 0
    first = read_json(tmp_path / "run/stages/neurons.attribute.json")["finished"]
    assert main(["neurons", "attribute", *base, "--k-sigma", "1"]) == 0        # fresh: reused
    assert read_json(tmp_path / "run/stages/neurons.attribute.json")["finished"] == first
    assert main(mine[:-2] + ["--max-tokens", "800"]) == 0                      # mine reruns on other data
    assert main(["neurons", "attribute", *base, "--k-sigma", "1"]) == 0
    rec = read_json(tmp_path / "run/stages/neurons.attribute.json")
    assert rec["finished"] > first and rec["why"] == "input changed: neurons/mine.json"


@dataclass(frozen=True)
class CorpusOptions:
    corpus: str = "default"


def count_words(model, run, opts: CorpusOptions, progress=True):
    from pathlib import Path
    CALLS.append("count")
    p = Path(opts.corpus)
    files = [p] if p.is_file() else sorted(p.rglob("*.txt"))
    write_json(run / "count.json", {"words": sum(len(f.read_text().split()) for f in files)})
    return {}


COUNT = Stage("t.count", CorpusOptions, f"{__name__}:count_words", writes=lambda o: ["count.json"])


def test_rewritten_corpus_reruns_the_stage(run, tmp_path, monkeypatch):
    """The contract hashes the *content* of files and folders an option names (a corpus rewritten in place,
    same path, same size, same mtime even, is a new input); the hash is cached by (path, size, mtime, inode)."""
    import os
    import headscope.runs as runs
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"d{i}.txt").write_text(f"one two three {i}\n")
    opts = CorpusOptions(str(corpus))
    assert run_stage(None, run, COUNT, opts)[1] and not run_stage(None, run, COUNT, opts)[1]
    for i in range(3):  # every file rewritten: same size, mtime put back
        f = corpus / f"d{i}.txt"
        st = f.stat()
        f.write_text(f"four five six {i}\n")
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    runs._HASH_CACHE.clear()  # a new process: small files are hashed from their bytes again
    summary, ran = run_stage(None, run, COUNT, opts)
    assert ran and run.record("t.count")["why"] == "input changed: file:corpus"
    assert read_json(run / "count.json")["words"] == 12
    (corpus / "d0.txt").write_text("seven\n")  # a plain rewrite, same process
    assert run_stage(None, run, COUNT, opts)[1] and read_json(run / "count.json")["words"] == 9
    (corpus / "new.txt").write_text("a b\n")  # a file added to the folder
    assert run_stage(None, run, COUNT, opts)[1]
    # large files keep their hash on disk: a second process does not read them again
    monkeypatch.setattr(runs, "PERSIST_HASHES_FROM", 1)
    runs._HASH_CACHE.clear()
    h = runs.file_hash(corpus / "new.txt")
    runs._HASH_CACHE.clear()
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-read")))
    assert runs.file_hash(corpus / "new.txt") == h


def test_neurons_mine_reruns_when_its_corpus_is_rewritten(tmp_path, model_dir):
    """Issue 23's stale case through the CLI: `neurons mine --corpus DIR`, every file of DIR rewritten,
    the same command runs again (and the tokenized corpus is rebuilt, not read from the cache)."""
    corpus = tmp_path / "docs"
    corpus.mkdir()
    from pydoc_data import topics
    keys = sorted(topics.topics)[:30]
    for i, k in enumerate(keys):
        (corpus / f"{i:02d}.txt").write_text(topics.topics[k])
    base = ["--model", str(model_dir), "--out", str(tmp_path / "run"), "--quiet"]
    assert main(["neurons", "find", *base, "--last-k", "1", "--per-layer", "2", "--no-require-space",
                 "--min-chars", "1"]) == 0
    mine = ["neurons", "mine", *base, "--seq-len", "48", "--top-k", "6", "--top-k-test", "4", "--max-tokens", "1000",
            "--corpus", str(corpus)]
    assert main(mine) == 0
    first = read_json(tmp_path / "run/stages/neurons.mine.json")
    assert main(mine) == 0
    assert read_json(tmp_path / "run/stages/neurons.mine.json")["finished"] == first["finished"]
    for i, k in enumerate(reversed(keys)):
        (corpus / f"{i:02d}.txt").write_text(topics.topics[k])
    assert main(mine) == 0
    rec = read_json(tmp_path / "run/stages/neurons.mine.json")
    assert rec["finished"] > first["finished"] and rec["why"] == "input changed: file:corpus"
