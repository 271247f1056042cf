"""Kill and resume: a training process killed at any moment — in the middle of a step, while a checkpoint
file is being written, between its write and its rename, right after the rename — resumes on the next run
and ends with exactly the weights of an uninterrupted run (SAE and lens).

The kill is a ``Killed`` exception (a BaseException, so no ``except Exception`` swallows it) raised at the
n-th training step or checkpoint-file operation of a process; what the files hold at that instant is what a
SIGKILL would leave (a kill mid-write leaves a truncated temporary file, which the test leaves behind by
hand, and which the next stage start removes). ``test_sigkill_subprocess`` does the same with real SIGKILLs
of a training subprocess at random moments (``-m slow``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import headscope.runs as runs
from headscope.runs import RunDir, read_tensors
from headscope.testing.tiny import tiny_model

from sae_helpers import small_corpus


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs in the killed process."""


SAE_OPTS = dict(n_tokens=12288, batch_size=256, buffer_tokens=2048, expansion=2, warmup_steps=5, checkpoint_every=7,
                architecture="topk", k=4)
LENS_SMALL = dict(tokens=768, init_tokens=128, batch_size=2, seq_len=32, chunk_tokens=24, checkpoint_every=2,
                  lr=1e-2)


@contextmanager
def kill_at(monkeypatch, mode: str, n: int, step_fn: tuple[object, str]):
    """Raise ``Killed`` at the n-th event of ``mode`` in the block: ``step`` (a training step starts),
    ``write`` (a checkpoint file is half written: a truncated temporary file is left), ``rename`` (the
    temporary file is complete, not yet renamed) or ``after`` (just renamed, before anything else)."""
    count = {"n": 0}

    def hit() -> bool:
        count["n"] += 1
        return count["n"] == n

    real_replace, real_save = os.replace, runs.save_file
    if mode == "step":
        mod, name = step_fn
        real_step = getattr(mod, name)

        def step(*a, **k):
            if hit():
                raise Killed(f"step {n}")
            return real_step(*a, **k)
        monkeypatch.setattr(mod, name, step)
    elif mode == "write":
        def save(tensors, filename, metadata=None):
            if "checkpoint" in str(filename) and hit():
                real_save(tensors, filename, metadata=metadata)
                data = Path(filename).read_bytes()
                Path(filename).write_bytes(data[: len(data) // 2])
                left = Path(str(filename) + ".left")   # what SIGKILL leaves: the except-cleanup never runs
                left.write_bytes(data[: len(data) // 2])
                raise Killed("mid-write")
            return real_save(tensors, filename, metadata=metadata)
        monkeypatch.setattr(runs, "save_file", save)
    else:
        def replace(src, dst):
            if "checkpoint" in str(dst) and hit():
                if mode == "after":
                    real_replace(src, dst)
                raise Killed(mode)
            return real_replace(src, dst)
        monkeypatch.setattr(runs.os, "replace", replace)
    try:
        yield count
    finally:
        monkeypatch.undo()


def _leftovers_to_tmp(folder: Path) -> None:
    """Turn the ``.left`` copies into the ``<name>.<rand>.tmp`` a killed ``write_tensors`` leaves."""
    for p in folder.rglob("*.left"):
        p.rename(p.with_name(p.name[:-5] + ".x1y2z3.tmp"))


# (mode, n) kills applied one after the other to the same run directory, each in a new "process"
# (48 steps, a checkpoint every 7 and at the end: the kills land at steps 3, 7 mid-write, 8, 14 before the
# rename, 21 after it, 31, 35 mid-write, 35 after the rename, 48 before the rename, 47)
SAE_KILLS = [("step", 3), ("write", 1), ("step", 9), ("rename", 1), ("after", 2), ("step", 10), ("write", 1),
             ("after", 1), ("rename", 2), ("step", 6)]


def test_sae_training_survives_kills_anywhere(tmp_path, monkeypatch):
    from headscope.sae import train as sae_train
    from headscope.sae.options import TrainOptions
    from headscope.sae.train import run_train
    model = tiny_model("llama_gqa")
    opts = TrainOptions(layer=1, corpus=small_corpus(tmp_path), **SAE_OPTS)
    full = run_train(model, RunDir(tmp_path / "a", model.identity()), opts, progress=False)
    b = RunDir(tmp_path / "b", model.identity())
    kills = 0
    for mode, n in SAE_KILLS:
        with kill_at(monkeypatch, mode, n, (sae_train, "_step")):
            try:
                run_train(model, b, opts, progress=False)
            except Killed:
                kills += 1
        _leftovers_to_tmp(tmp_path / "b")
        with runs.using_run(b.path):  # what the next stage start does
            pass
        assert not list((tmp_path / "b").rglob("*.tmp")), "a temporary leftover survived the next start"
    assert kills == len(SAE_KILLS)
    done = run_train(model, b, opts, progress=False)
    assert done["n_steps"] == full["n_steps"] == 48
    wa = read_tensors(tmp_path / "a/sae/L1/sae_weights.safetensors")
    wb = read_tensors(tmp_path / "b/sae/L1/sae_weights.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# (12 steps, a checkpoint at 0 and every 2: kills at the first checkpoint, step 2, 4 mid-write, 6 after the
# rename, step 9, 12 before the rename, 12 after it)
LENS_KILLS = [("rename", 1), ("step", 2), ("write", 2), ("after", 2), ("step", 3), ("rename", 2), ("after", 1)]


def test_lens_training_survives_kills_anywhere(tmp_path, monkeypatch):
    from headscope.lens import train as lens_train
    from headscope.lens.lenses import LensConfig, load_bank
    from headscope.lens.train import LensTrainConfig, run_train
    m = tiny_model("llama_gqa")
    sites = [(0, 0), (2, 3)]
    cfg = LensTrainConfig(**LENS_SMALL)
    ra = RunDir(tmp_path / "a", m.identity())
    run_train(m, ra, sites, LensConfig(), cfg, progress=False)
    rb = RunDir(tmp_path / "b", m.identity())
    kills = 0
    for mode, n in LENS_KILLS:
        with kill_at(monkeypatch, mode, n, (lens_train, "train_step")):
            torch.manual_seed(1000 + kills)  # a new process: another global RNG state
            try:
                run_train(m, rb, sites, LensConfig(), cfg, progress=False)
            except Killed:
                kills += 1
        _leftovers_to_tmp(tmp_path / "b")
    assert kills == len(LENS_KILLS)
    s = run_train(m, rb, sites, LensConfig(), cfg, progress=False)
    assert s["resumed"] and s["steps"] == 12
    a, _ = load_bank(m, tmp_path / "a/lens")
    b, _ = load_bank(m, tmp_path / "b/lens")
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), n
    assert torch.equal(read_tensors(tmp_path / "a/lens/null.safetensors")["null_logits"],
                       read_tensors(tmp_path / "b/lens/null.safetensors")["null_logits"])


SIGKILL_SCRIPT = r"""
import sys
from headscope.runs import RunDir
from headscope.sae.options import TrainOptions
from headscope.sae.train import run_train
from headscope.testing.tiny import tiny_model
m = tiny_model("llama_gqa")
run_train(m, RunDir(sys.argv[1], m.identity()),
          TrainOptions(layer=1, corpus=sys.argv[2], n_tokens=24576, batch_size=256, buffer_tokens=2048, expansion=2,
                       warmup_steps=5, checkpoint_every=1, architecture="topk", k=4), progress=False)
"""


@pytest.mark.slow
def test_sigkill_subprocess(tmp_path):
    """Real SIGKILLs at random moments of a training subprocess (a checkpoint every step, so most kills
    land in or near a checkpoint write); the last, unkilled run equals an uninterrupted one."""
    import random
    corpus = small_corpus(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(runs.__file__).parents[1])] + sys.path),
           "OMP_NUM_THREADS": "1"}
    script = tmp_path / "train.py"
    script.write_text(SIGKILL_SCRIPT)
    subprocess.run([sys.executable, str(script), str(tmp_path / "a"), corpus], env=env, check=True)
    rng = random.Random(0)
    for _ in range(6):
        p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "b"), corpus], env=env)
        time.sleep(rng.uniform(4.0, 9.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
    subprocess.run([sys.executable, str(script), str(tmp_path / "b"), corpus], env=env, check=True)
    wa = read_tensors(tmp_path / "a/sae/L1/sae_weights.safetensors")
    wb = read_tensors(tmp_path / "b/sae/L1/sae_weights.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
