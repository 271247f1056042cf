"""Every bad input is a one-line error: exit status 2, exactly one line on stderr, nothing written.

One table row per bad input, across every command. A row is the command line a user would type, with
placeholders for the fixture's paths, and a regular expression the error line must match. Each row
runs ``headscope.cli.main(argv)`` in-process against a tiny random model saved to disk and a finished
tiny run (heads, lens, SAE, neurons, atlas), and checks that no file under the test's folder was
created, changed or removed (a bad ``--force`` must not overwrite good data; a bad ``--out`` must not
create a run directory).

A new command joins the table with one ``bad(...)`` row per bad input. Rows that are not fixed yet are
``pending(...)``: a strict xfail naming who fixes it, so the row fails loudly once it is fixed and the
marker must go.

Placeholders: ``{model}`` the saved tiny model, ``{run}`` the finished run, ``{nonull}`` a copy of its
lenses without the null lens, ``{new}`` a path that does not exist (and must not afterwards),
``{file}`` an existing plain file, ``{empty}`` an empty file, ``{ro}`` a read-only folder, ``{toml:X}``
a study config from ``CONFIGS[X]``, ``{sae}`` the run's SAE folder, ``{listrun}`` / ``{strmodel}`` run
directories whose run.json is ``[]`` / names its model by a bare string, ``{badrec}`` a run whose stage record
is ``[]``, ``{atlasfile}`` a run whose ``atlas`` is a file, ``{rorun}`` a read-only run, ``{xff}`` a corpus
file whose name is not UTF-8, ``{xffname}`` such a string as an argument, ``{nulfile}`` a text file with NUL
bytes.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

from headscope.cli import main
from headscope.testing.study import tiny_study

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
LEAD = "lead: stage contract / options dataclasses (issue 11)"

CONFIGS = {
    "typo_int": '[heads.score]\nn_seqs = "two"\n',
    "typo_layers": "[lens.train]\nlayers = [2]\n",
    "typo_k": '[sae.train]\nlayer = 1\nk = "8"\n',
    "unknown_table": "[nonsense]\nx = 1\n",
    "bad_range": "[heads.score]\nn_seqs = 0\n",
    # issue 23: every [study] key type-checked, every option range-checked, all in the plan
    "out_int": "[study]\nout = 5\n[heads.score]\n",
    "model_int": "[study]\nmodel = 5\n[heads.score]\n",
    "out_nul": '[study]\nout = "a\\u0000b"\n[heads.score]\n',
    "dtype_bad": '[study]\ndtype = "int8"\n[heads.score]\n',
    "refresh_int": "[study]\nrefresh_atlas = 5\n[heads.score]\n",
    "study_scalar": "study = 5\n[heads.score]\n",
    "array_table": "[[heads.score]]\nn_seqs = 2\n",
    "enabled_str": '[heads.score]\nenabled = "false"\n',
    "instrument_enabled_str": '[heads]\nenabled = "no"\n[heads.score]\n',
    "atlas_enabled_str": '[heads.score]\n[atlas]\nenabled = "no"\n',
    "empty": "",
    "only_study": '[study]\nname = "x"\n',
    "layers_abc": '[heads.score]\nlayers = "abc"\n',
    "layer_99": "[sae.train]\nlayer = 99\nn_tokens = 512\n",
    "layers_99": '[heads.score]\nlayers = "99"\n',
    "lr_nan": "[sae.train]\nlayer = 1\nlr = nan\n",
    "lr_inf": "[lens.train]\nlr = inf\n",
    "seed_neg": "[heads.score]\nseed = -1\n",
    "seed_huge": "[heads.score]\nseed = 9223372036854775807\n",
    "name_escape": '[sae]\nname = "../../escaped"\n[sae.train]\nlayer = 1\n',
    "decay_frac": "[sae.train]\nlayer = 1\ndecay_frac = 5.0\n",
}

STUDY = tiny_study("heads.score", "lens.train", "lens.eval", "sae.train", "neurons.find", "neurons.mine")


def bad(cmd: str, match: str, id: str | None = None):
    """A bad input that is handled: ``cmd`` (shell words, placeholders) fails with one line matching ``match``."""
    return pytest.param(cmd, match, id=id or cmd)


def pending(cmd: str, match: str, reason: str, id: str | None = None):
    """A bad input that is not handled yet (strict xfail: fixing it fails this row until the marker goes)."""
    return pytest.param(cmd, match, id=id or cmd, marks=pytest.mark.xfail(strict=True, reason=reason))


def as_user(cmd: str, match: str, id: str | None = None):
    """A row that needs permissions to bite (read-only folders): skipped when the tests run as root."""
    return pytest.param(cmd, match, id=id or cmd,
                        marks=pytest.mark.skipif(AS_ROOT, reason="root ignores read-only permissions"))


M = "--model {model}"
ROWS = [
    # ---- heads
    bad(f"heads score {M} --out {{new}} --n-seqs 0", r"n.seqs"),
    bad(f"heads score {M} --out {{new}} --batch-size 0", r"batch.size"),
    bad(f"heads score {M} --out {{new}} --prefix-examples -1", r"prefix.examples"),
    bad(f"heads roles {M} --out {{new}} --text-seqs 1", r"--text-seqs and --task-seqs must be at least 2"),
    bad(f"heads roles {M} --out {{new}} --q 1.5", r"--q must be in \(0, 1\)"),
    bad(f"heads roles {M} --out {{new}} --task-len 8", r"--task-len must be at least 16"),
    bad(f"heads score {M} --out {{new}} --layers abc", r"cannot parse layers 'abc'"),
    bad(f"heads score {M} --out {{new}} --layers 99", r"layer 99 is out of range"),
    bad(f"heads score {M} --out {{new}} --half-len 100000", r"context"),
    bad(f"heads score {M} --out {{file}} --n-seqs 2", r"--out .* is a file"),
    bad(f"heads score {M} --out {{new}} --n-seqs two", r"n.seqs"),
    # ---- lens
    bad(f"lens train {M} --out {{new}} --layers 99", r"layer 99 is out of range"),
    bad(f"lens train {M} --out {{new}} --heads 9.9", r"layer 9 is out of range"),
    bad(f"lens train {M} --out {{new}} --tokens -1", r"tokens"),
    bad(f"lens train {M} --out {{new}} --batch-size 100000 --tokens 16 --init-tokens 16", r"batch.size"),
    bad(f"lens train {M} --out {{file}}", r"--out .* is a file"),
    as_user(f"lens train {M} --out {{ro}}/sub --tokens 0", r"not writable"),
    bad(f"lens train {M} --out {{new}} --kind bogus", r"kind"),
    bad(f"lens eval {M} --out {{new}}", r"lens train"),
    bad(f"lens eval {M} --out {{file}}", r"--out .* is a file"),
    bad(f"lens show {M} --out {{run}} -k 100000 hello", r"-k"),
    bad(f"lens show {M} --out {{run}} -k 0 hello", r"-k"),
    bad(f"lens show {M} --out {{run}} -k -1 hello", r"-k"),
    bad(f"lens show {M} --out {{run}} --heads 0.0 hello", r"no lens trained for head"),
    bad(f"lens show {M} --out {{new}} hello", r"no run directory"),
    bad(f"lens show {M} --out {{nonull}} hello", r"[^s]/lens/null\.safetensors"),
    bad(f"lens scan {M} --out {{run}} --token-list {{new}} --prompts {{file}}", r"token list file not found"),
    bad(f"lens scan {M} --out {{run}} --token-list {{file}} --prompts {{empty}}", r"prompts file .* is empty"),
    bad(f"lens scan {M} --out {{run}} --token-list {{file}} --prompts {{file}} -k 0", r"-k"),
    bad(f"lens steer {M} --out {{run}} hello --add 9.9:x", r"layer 9 is out of range"),
    bad(f"lens steer {M} --out {{run}} hello --scale 0.0:abc", r"cannot parse --scale"),
    bad(f"lens steer {M} --out {{run}} hello --ablate 0.0 --new-tokens 0", r"new.tokens"),
    # ---- sae
    bad(f"sae dfa {M} --out {{run}} --name L1 --feature 9999 --prompt hello", r"feature"),
    bad(f"sae dfa {M} --out {{run}} --name L1 --feature -1 --prompt hello", r"feature"),
    bad(f"sae dfa {M} --out {{run}} --name nope --feature 1 --prompt hello", r"nope"),
    bad(f"sae dfa {M} --out {{run}} --name L1 --feature 1 --prompt hello --dest 99", r"--dest 99 is out of range"),
    bad(f"sae train {M} --out {{new}} --layer 99", r"layer 99 is out of range"),
    bad(f"sae train {M} --out {{new}} --layer 0 --k 0", r"\bk\b"),
    bad(f"sae train {M} --out {{new}} --layer 0 --n-tokens 0", r"n.tokens"),
    bad(f"sae train {M} --out {{new}} --layer 0 --batch-size 0", r"batch.size"),
    bad(f"sae train {M} --out {{new}} --layer 0 --cache {{new}}", r"cache"),
    bad(f"sae train {M} --out {{new}} --layer 0 --architecture bogus", r"architecture"),
    bad(f"sae eval {M} --out {{run}} --name nope", r"nope"),
    bad(f"sae eval {M} --out {{run}} --name L1 --n-tokens 0 --force", r"n.tokens"),
    bad(f"sae sweep {M} --out {{new}} --layer 0 --values a b", r"values"),
    bad(f"sae cache {M} --layers 99 --dir {{new}}", r"layer 99 is out of range"),
    bad(f"sae cache {M} --layers 0 --dir {{file}} --tokens 100", r"--dir|not a directory|is a file"),
    bad(f"sae analysis {M} --out {{run}} --name nope", r"nope"),
    bad(f"sae analysis {M} --out {{run}} --name L1 --n-planted -1", r"--n-planted must lie in \[0, 10000\]"),
    bad(f"sae analysis {M} --out {{run}} --name L1 --planted-cos 1.5", r"--planted-cos must lie in \[0, 1\]"),
    bad(f"sae dashboards {M} --out {{run}} --name L1 --n-tokens 0", r"n.tokens"),
    bad(f"sae ioi {M} --out {{run}} --name L1 --n-prompts 0", r"n.prompts"),
    # ---- neurons
    bad(f"neurons mine {M} --out {{run}} --top-k 0 --force", r"top.k"),
    bad(f"neurons mine {M} --out {{run}} --keep 2 --force", r"keep"),
    bad(f"neurons find {M} --out {{run}} --per-layer 0 --force", r"per.layer"),
    bad(f"neurons find {M} --out {{run}} --layers 77 --force", r"layer 77 is out of range"),
    bad(f"neurons find {M} --out {{run}} --reject-file {{new}} --force", r"reject"),
    bad(f"neurons attribute {M} --out {{run}} --low 0.9 --high 0.1 --force", r"low.*high|high.*low"),
    bad(f"neurons attribute {M} --out {{new}}", r"neurons mine"),
    bad(f"neurons find {M} --out {{new}} --which bogus", r"which"),
    bad(f"neurons ablate {M} --out {{new}}", r"no run directory|neurons attribute"),
    bad(f"neurons ablate {M} --out {{run}} --mode bogus", r"mode"),
    # ---- explain
    bad(f"explain run {M} --out {{run}} --backend openai --base-url 'not a url'", r"base.url"),
    bad(f"explain run {M} --out {{run}} --backend openai --base-url http://127.0.0.1:9/v1 --concurrency 0",
        r"concurrency"),
    bad("explain compare --out {new}", r"no run directory"),
    bad(f"explain baseline {M} --out {{new}}", r"no run directory|neurons"),
    bad(f"explain baseline {M} --out {{run}} --timeout 0", r"timeout"),
    bad(f"explain dry-run {M} --out {{run}} --backend openai --base-url 'not a url'", r"base.url"),
    bad(f"explain score {M} --out {{new}}", r"no run directory|neurons mine"),
    # ---- atlas
    bad("atlas serve {run} --no-model --port 70000", r"--port 70000 is out of range"),
    bad("atlas serve {run} --no-model --port -1", r"--port -1 is out of range"),
    bad("atlas serve {run} --no-model --host 999.1.1.1 --port 0", r"cannot listen on 999\.1\.1\.1"),
    bad("atlas serve {new} --no-model", r"no run directory"),
    bad("atlas serve {file} --no-model", r"no run directory"),
    bad("atlas build {new} --no-model", r"no run directory"),
    bad("atlas serve {run} --no-model --port abc", r"port"),
    # ---- study
    bad(f"study {{new}} {M} --out {{new}}", r"study config not found"),
    bad(f"study {{file}} {M} --out {{new}}", r"not valid TOML"),
    bad(f"study {{toml:unknown_table}} {M} --out {{new}}", r"unknown table|nonsense"),
    bad(f"study {{toml:typo_int}} {M} --out {{new}}", r"n_seqs"),
    bad(f"study {{toml:typo_layers}} {M} --out {{new}}", r"layers"),
    bad(f"study {{toml:typo_k}} {M} --out {{new}}", r"\bk\b"),
    bad(f"study {{toml:bad_range}} {M} --out {{new}}", r"n.seqs"),
    # ---- explain (SAE features, pair scores, head labels) and export
    bad(f"explain features {M} --out {{run}} --sae nope", r"nope"),
    bad(f"explain features {M} --out {{run}} --sae L1 --features 0", r"features"),
    bad(f"explain features-dry-run {M} --out {{run}} --sae nope", r"nope"),
    bad(f"explain score-features {M} --out {{run}} --sae nope", r"nope"),
    bad(f"explain score-pairs {M} --out {{run}} --max-test 0", r"max.test"),
    bad(f"explain label {M} --out {{run}} --top-frac 2", r"top.frac"),
    bad(f"export hf --out {{run}} --sae nope --to {{new}}", r"nope"),
    bad(f"export neuronpedia --out {{run}} --sae L1 --to {{new}} --batch-size 0", r"batch.size"),
    bad(f"sae import {M} --out {{new}} --path {{new}} --name X", r"does not exist|not found|missing"),
    # ==== issue 23 ====
    # ---- names that become paths stay inside their folder
    bad(f"sae train {M} --out {{new}} --layer 1 --name ../../escaped", r"--name '\.\./\.\./escaped' is not a plain"),
    bad(f"sae train {M} --out {{new}} --layer 1 --name ..", r"--name '\.\.' is not a plain"),
    bad(f"sae train {M} --out {{new}} --layer 1 --name a/b", r"--name 'a/b' is not a plain"),
    bad(f"sae train {M} --out {{new}} --layer 1 --name .hidden", r"--name '\.hidden' is not a plain"),
    bad(f"sae train {M} --out {{new}} --layer 1 --name x.tmp", r"--name 'x\.tmp' is not a plain"),
    bad(f"sae train {M} --out {{new}} --layer 1 --name ''", r"--name '' is not a plain"),
    bad(f"sae import {M} --out {{new}} --path {{sae}} --name ../../x", r"--name .* not a plain"),
    bad(f"sae import {M} --out {{run}} --path {{sae}} --name /tmp/x", r"--name .* not a plain"),
    bad(f"sae eval {M} --out {{run}} --name ../L1", r"--name .* not a plain"),
    bad(f"sae analysis {M} --out {{run}} --name ../../x", r"--name .* not a plain"),
    bad(f"sae dashboards {M} --out {{run}} --name /tmp/x", r"--name .* not a plain"),
    bad(f"sae ioi {M} --out {{run}} --name ../L1", r"--name .* not a plain"),
    bad(f"sae dfa {M} --out {{run}} --name ../../x --feature 1 --prompt hello", r"--name .* not a plain"),
    bad("export hf --out {run} --sae L1 --to /proc/headscope-export", r"--to /proc/headscope-export: cannot write"),
    bad("export hf --out {run} --sae L1 --to {file}/repo", r"--to .*/repo: cannot write"),
    bad("export hf --out {run} --sae L1 --to {run}", r"exists"),
    as_user("export hf --out {run} --sae L1 --to {ro}/repo", r"--to .*cannot write"),
    # ---- study: [study] keys typed, options range-checked, everything before a file is written
    bad(f"study {{toml:out_int}} {M}", r"\[study\] out = 5: expected a non-empty string"),
    bad(f"study {{toml:model_int}} --out {{new}}", r"\[study\] model = 5"),
    bad(f"study {{toml:out_nul}} {M}", r"\[study\] out = .*expected a non-empty string"),
    bad(f"study {{toml:dtype_bad}} {M} --out {{new}}", r"dtype"),
    bad(f"study {{toml:refresh_int}} {M} --out {{new}}", r"refresh_atlas"),
    bad(f"study {{toml:study_scalar}} {M} --out {{new}}", r"\[study\] must be a table"),
    bad(f"study {{toml:array_table}} {M} --out {{new}}", r"\[heads\.score\] must be one table"),
    bad(f"study {{toml:enabled_str}} {M} --out {{new}}", r"enabled = 'false': expected true or false"),
    bad(f"study {{toml:instrument_enabled_str}} {M} --out {{new}}", r"\[heads\] enabled = 'no'"),
    bad(f"study {{toml:atlas_enabled_str}} {M} --out {{new}}", r"\[atlas\] enabled = 'no'"),
    bad(f"study {{toml:empty}} {M} --out {{new}}", r"no stage tables"),
    bad(f"study {{toml:only_study}} {M} --out {{new}}", r"no stage tables"),
    bad(f"study {{toml:layers_abc}} {M} --out {{new}}", r"\[heads\.score\] cannot parse layers 'abc'"),
    bad(f"study {{toml:layer_99}} {M} --out {{new}}", r"\[sae\.train\] layer 99 is out of range"),
    bad(f"study {{toml:layers_99}} {M} --out {{new}}", r"\[heads\.score\] layer 99 is out of range"),
    bad(f"study {{toml:lr_nan}} {M} --out {{new}}", r"lr must be a positive number|finite"),
    bad(f"study {{toml:lr_inf}} {M} --out {{new}}", r"learning rate|finite"),
    bad(f"study {{toml:seed_neg}} {M} --out {{new}}", r"--seed must be 0 or more"),
    bad(f"study {{toml:seed_huge}} {M} --out {{new}}", r"--seed .* out of range"),
    bad(f"study {{toml:name_escape}} {M} --out {{new}}", r"--name '\.\./\.\./escaped' is not a plain"),
    bad(f"study {{toml:decay_frac}} {M} --out {{new}}", r"decay-frac"),
    bad(f"study {{toml:typo_int}} {M} --out {{file}}", r"n_seqs|is a file"),
    # ---- numbers: finite, within 64 bits, seeds and indexes non-negative
    bad(f"lens train {M} --out {{new}} --lr nan", r"learning rate"),
    bad(f"lens train {M} --out {{new}} --lr inf", r"learning rate"),
    bad(f"lens train {M} --out {{new}} --lr -1", r"learning rate"),
    bad(f"lens train {M} --out {{new}} --weight-decay -1", r"weight.decay"),
    bad(f"lens train {M} --out {{new}} --clip inf", r"clip"),
    bad(f"sae train {M} --out {{new}} --layer 1 --lr nan", r"--lr"),
    bad(f"sae train {M} --out {{new}} --layer 1 --lr inf", r"--lr"),
    bad(f"sae train {M} --out {{new}} --layer 1 --decay-frac 5", r"decay.frac"),
    bad(f"sae train {M} --out {{new}} --layer 1 --l1 inf", r"l1.coeff|finite"),
    bad(f"sae train {M} --out {{new}} --layer 1 --warmup-steps -1", r"warmup.steps"),
    bad(f"sae train {M} --out {{new}} --layer 1 --dead-tokens 0", r"dead.tokens"),
    bad(f"heads score {M} --out {{new}} --seed 99999999999999999999999", r"--seed .* out of range"),
    bad(f"heads score {M} --out {{new}} --seed -1", r"--seed must be 0 or more"),
    bad(f"heads score {M} --out {{new}} --n-seqs 99999999999999999999999", r"n.seqs .*out of range"),
    bad(f"sae eval {M} --out {{run}} --name L1 --min-effect nan --force", r"min.effect"),
    bad(f"sae dfa {M} --out {{run}} --name L1 --feature 1 --prompt hello --recursive --top=-3", r"--top"),
    bad(f"sae ioi {M} --out {{run}} --name L1 --max-features 0", r"max.features"),
    bad(f"neurons attribute {M} --out {{run}} --low nan --force", r"--low|finite"),
    bad(f"explain label {M} --out {{run}} --top-frac nan", r"top.frac"),
    bad(f"lens steer {M} --out {{run}} hello --add 2.0:", r"cannot parse --add '2\.0:'"),
    bad(f"lens steer {M} --out {{run}} hello --add 2.0:x:inf", r"cannot parse --add"),
    bad(f"lens steer {M} --out {{run}} hello --scale 0.0:nan", r"cannot parse --scale"),
    bad(f"lens steer-eval {M} --out {{run}} --n-tokens 1", r"--n-tokens must be in 2\.\.10000"),
    bad(f"lens steer-eval {M} --out {{run}} --strengths 0", r"--strengths: give positive values"),
    bad(f"lens steer-eval {M} --out {{run}} --heads 99.0", r"out of range"),
    bad("atlas serve {run} --no-model --port 99999999999999999999", r"--port .*out of range"),
    # ---- devices
    bad(f"heads score {M} --out {{new}} --device meta", r"--device 'meta'"),
    bad(f"heads score {M} --out {{new}} --device bogus", r"--device 'bogus'"),
    # ---- file inputs: unreadable, not UTF-8, NUL bytes
    bad(f"neurons mine {M} --out {{run}} --corpus /proc/self/mem --force", r"cannot read '/proc/self/mem'"),
    bad(f"sae train {M} --out {{new}} --layer 1 --corpus /proc/self/mem", r"cannot read '/proc/self/mem'"),
    bad(f"neurons mine {M} --out {{run}} --corpus {{xff}} --force", r"--corpus .* not valid UTF-8"),
    bad(f"lens show {M} --out {{run}} {{xffname}}", r"--prompt .* not valid UTF-8"),
    bad(f"lens scan {M} --out {{run}} --token-list {{file}} --prompts {{nulfile}}", r"NUL bytes"),
    # ---- run directories and stage records that are not what they should be
    bad(f"heads score {M} --out {{listrun}}", r"corrupt run directory"),
    bad(f"lens eval {M} --out {{listrun}}", r"corrupt run directory|lens train"),
    bad("atlas build {listrun} --no-model", r"corrupt run directory"),
    bad("atlas serve {listrun} --no-model", r"corrupt run directory|no atlas"),
    bad(f"heads score {M} --out {{strmodel}}", r"corrupt run directory"),
    bad(f"heads score {M} --out {{badrec}}", r"corrupt stage record"),
    bad("atlas build {atlasfile} --no-model", r"atlas is a file"),
    as_user("atlas build {rorun} --no-model", r"cannot write the atlas|not writable"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny model, a finished tiny run (every instrument + atlas) and a few odd paths."""
    from headscope.atlas.build import build_atlas
    from headscope.models.load import load_model
    from headscope.study import load_config, run_study
    from headscope.testing.tiny import save_tiny_model
    root = tmp_path_factory.mktemp("bad")
    model_dir = save_tiny_model("llama_gqa", root / "model")
    model = load_model(str(model_dir))
    (root / "study.toml").write_text(STUDY)
    run_study(load_config(root / "study.toml"), out=root / "run", model=model, progress=False)
    build_atlas(root / "run", model=None, progress=False)
    nonull = root / "nonull"
    shutil.copytree(root / "run" / "lens", nonull / "lens")
    shutil.copy(root / "run" / "run.json", nonull / "run.json")
    (nonull / "lens" / "null.safetensors").unlink()
    (root / "file.txt").write_text("the\nword\n")
    (root / "empty.txt").write_text("")
    ro = root / "ro"
    ro.mkdir()
    for name, text in CONFIGS.items():
        (root / f"{name}.toml").write_text(text)
    runjson = (root / "run" / "run.json").read_text()
    for name, text in {"listrun": "[]", "strmodel": '{"format_version": 1, "model": "other-model"}',
                       "badrec": runjson, "atlasfile": runjson, "rorun": runjson}.items():
        (root / name).mkdir()
        (root / name / "run.json").write_text(text)
    (root / "badrec" / "stages").mkdir()
    (root / "badrec" / "stages" / "heads.score.json").write_text("[]")
    (root / "atlasfile" / "atlas").write_text("not a folder")
    (root / os.fsdecode(b"\xff.txt")).write_text("a corpus file whose name is not UTF-8\n" * 50)
    (root / "nul.txt").write_bytes(b"a prompt\n\x00\x00 another\n")
    os.chmod(ro, 0o555)
    os.chmod(root / "rorun", 0o555)
    pristine = tmp_path_factory.mktemp("pristine")
    shutil.copytree(root, pristine / "root", symlinks=True, ignore=shutil.ignore_patterns("model", "ro", "rorun"))
    yield {"root": root, "model": model_dir, "pristine": pristine / "root"}
    os.chmod(ro, 0o755)
    os.chmod(root / "rorun", 0o755)


def restore(world, changed: list[str]) -> None:
    """Undo what a failing row wrote, so that the next rows see the fixture as it was."""
    root, pristine = world["root"], world["pristine"]
    for top in sorted({c.split(os.sep)[0] for c in changed} - {"model", "ro", "rorun", "."}):
        target = root / top
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        src = pristine / top
        if src.is_dir():
            shutil.copytree(src, target)
        elif src.exists():
            shutil.copy2(src, target)


def expand(cmd: str, world) -> list[str]:
    root = world["root"]
    paths = {"model": world["model"], "run": root / "run", "nonull": root / "nonull", "new": root / "new",
             "file": root / "file.txt", "empty": root / "empty.txt", "ro": root / "ro",
             "sae": root / "run" / "sae" / "L1", "listrun": root / "listrun", "strmodel": root / "strmodel",
             "badrec": root / "badrec", "atlasfile": root / "atlasfile", "rorun": root / "rorun",
             "xff": root / os.fsdecode(b"\xff.txt"), "xffname": os.fsdecode(b"caf\xe9"), "nulfile": root / "nul.txt"}
    cmd = re.sub(r"\{toml:(\w+)\}", lambda m: shlex.quote(str(root / f"{m.group(1)}.toml")), cmd)
    return [w.format(**{k: str(v) for k, v in paths.items()}) for w in shlex.split(cmd)]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root`` with its size and modification time (the saved model excluded)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == "model":
            dirnames[:] = []
            continue
        out[rel + "/"] = None
        for f in filenames:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.join(rel, f)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture()
def quiet_hub(monkeypatch):
    """No download-style progress bars from transformers, no API key from the environment, and a server
    that would start serving fails instead of blocking the test."""
    import transformers
    from headscope.atlas import server

    def refuse(self):
        raise RuntimeError("a bad input started the atlas server")
    monkeypatch.setattr(server.AtlasServer, "serve_forever", refuse)
    transformers.utils.logging.disable_progress_bar()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("HEADSCOPE_BASE_URL", "https://api.openai.com/v1")
    yield
    transformers.utils.logging.enable_progress_bar()


@pytest.mark.parametrize("cmd,match", ROWS)
def test_bad_input_is_one_line_and_writes_nothing(cmd, match, world, quiet_hub, capsys):
    argv = expand(cmd, world)
    before = snapshot(world["root"])
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    after = snapshot(world["root"])
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k, 0) != after.get(k, 0))
    if changed:
        restore(world, changed)
    assert rc == 2, f"exit status {rc}, stderr: {err[-800:]}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err[-1500:]}"
    assert lines[0].startswith("headscope: error: ") or lines[0].startswith("headscope"), lines[0]
    assert re.search(match, lines[0]), f"{lines[0]!r} does not match {match!r}"
    assert not changed, f"written: {changed[:10]}"


def test_the_table_covers_every_command():
    """Each subcommand the CLI offers has at least one row (a new command must add its bad inputs)."""
    from headscope.cli import build_parser
    parser = build_parser()
    commands = set()
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            subs = [a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"]
            if not subs:
                commands.add(name)
            for a in subs:
                commands |= {f"{name} {n}" for n in a.choices}
    covered = {" ".join(p.values[0].split()[:2]) for p in ROWS} | {p.values[0].split()[0] for p in ROWS}
    exempt = {"demo"}  # demo: a study of a built-in config; its bad inputs are the study's
    missing = sorted(c for c in commands - exempt if c not in covered)
    assert not missing, f"commands without a bad-input row: {missing}"
    assert len(ROWS) >= 40
