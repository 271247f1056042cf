"""Lens training under torchrun: 2 CPU processes on the gloo backend equal one process with the
doubled batch (each rank reads its share of every global batch; gradients are averaged)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import torch

from headscope.lens.lenses import LensConfig, load_bank
from headscope.lens.options import LensTrainConfig
from headscope.lens.train import run_train
from headscope.runs import RunDir
from headscope.testing.tiny import tiny_model

CFG = dict(tokens=512, init_tokens=256, seq_len=32, chunk_tokens=32, checkpoint_every=3, lr=1e-2, optimizer="sgd")
# SGD: Adam moves every coordinate by about ±lr whatever the size of its gradient, so float-noise
# gradients (summation order differs between 1 and 2 processes) would differ by ~lr after a few steps
SITES = [(1, 0), (2, 3)]

SCRIPT = textwrap.dedent("""
    import sys, torch
    from headscope.distributed import Distributed
    from headscope.lens.lenses import LensConfig
    from headscope.lens.options import LensTrainConfig
    from headscope.lens.train import run_train
    from headscope.runs import RunDir
    from headscope.testing.tiny import tiny_model
    torch.set_num_threads(1)
    dist = Distributed().init("cpu")
    m = tiny_model("gpt2")
    out = sys.argv[1]
    run = RunDir(out, m.identity()) if dist.primary else None
    dist.barrier()
    run = run or RunDir(out, m.identity())
    run_train(m, run, {sites}, LensConfig(), LensTrainConfig(batch_size=2, **{cfg}), progress=False, dist=dist)
    dist.destroy()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_equal_single_process(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT.format(sites=SITES, cfg=CFG))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(tmp_path / "ddp")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    m = tiny_model("gpt2")
    single = RunDir(tmp_path / "single", m.identity())
    s = run_train(m, single, SITES, LensConfig(), LensTrainConfig(batch_size=4, **CFG), progress=False)
    a, info = load_bank(m, tmp_path / "ddp" / "lens")
    b, _ = load_bank(m, tmp_path / "single" / "lens")
    assert info["train"]["batch_size"] == 2 and s["steps"] == 4
    # parameters agree up to float summation order (A only on the head's subspace: elsewhere Adam moves
    # float-noise gradients by ±lr, which no head output ever sees)
    n = a.n_real_lenses  # the control lens reads a scrambled input whose donors depend on the per-rank batch
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        if name in ("A", "b"):  # b = −r̄·M inherits the float noise of A's off-subspace directions
            continue
        pa, pb = pa[:n], pb[:n]
        assert (pa - pb).abs().max() <= 1e-3 * (1 + pb.abs().max()), (name, float((pa - pb).abs().max()))
    from headscope.lens.collect import site_batch
    R, _ = site_batch(m, torch.randint(1, 512, (2, 16), generator=torch.Generator().manual_seed(5)), SITES)
    torch.testing.assert_close(a(R), b(R), rtol=1e-3, atol=2e-3)
