"""torchrun-style data parallel training with two gloo CPU processes."""

import os
import socket

import torch
import torch.multiprocessing as mp

from sae_helpers import small_corpus

OPTS = dict(n_tokens=32768, batch_size=256, buffer_tokens=2048, expansion=2, warmup_steps=3, architecture="topk", k=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, root, corpus, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from headscope.distributed import Distributed
    from headscope.runs import RunDir
    from headscope.sae.options import TrainOptions
    from headscope.sae.train import run_train
    from headscope.testing.tiny import tiny_model
    model = tiny_model("llama_gqa")
    dist = Distributed(rank=rank, local_rank=rank, world_size=world)
    run = RunDir(root, model.identity())
    res = run_train(model, run, TrainOptions(layer=1, corpus=corpus, **OPTS), progress=False, dist=dist)
    out[rank] = {"sha": res["weights_sha1"], "steps": res["n_steps"], "world": res["world_size"],
                 "mse": [h["mse"] for h in res["history"] if "mse" in h]}
    dist.destroy()


def test_ddp_two_gloo_processes(tmp_path):
    corpus = small_corpus(tmp_path)
    from headscope.data import TokenCorpus
    from headscope.testing.tiny import tiny_model
    TokenCorpus(tiny_model("llama_gqa"), corpus, progress=False)  # tokenize once, before the workers
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "run"), corpus, out), nprocs=2, join=True)
    assert out[0]["sha"] == out[1]["sha"]              # gradients averaged: both ranks hold the same SAE
    assert out[0]["world"] == 2 and out[0]["steps"] == OPTS["n_tokens"] // (256 * 2)
    assert out[0]["mse"][-1] < out[0]["mse"][0]
    assert (tmp_path / "run/sae/L1/cfg.json").is_file()
    # a single process on the same options trains on half the batches per step: a different SAE
    from headscope.runs import RunDir
    from headscope.sae.options import TrainOptions
    from headscope.sae.train import run_train
    model = tiny_model("llama_gqa")
    single = run_train(model, RunDir(tmp_path / "single", model.identity()), TrainOptions(layer=1, corpus=corpus, **OPTS),
                       progress=False)
    assert single["n_steps"] == 2 * out[0]["steps"] and single["weights_sha1"] != out[0]["sha"]
