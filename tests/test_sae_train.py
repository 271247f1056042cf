"""SAE training on tiny models: resume equals uninterrupted, cache equals streaming, bad input
(NaN activations, empty cache, full disk, other model), decoder norms."""

import errno

import pytest
import torch

from headscope.data import TokenCorpus
from headscope.errors import HeadscopeError
from headscope.runs import RunDir, read_json, read_tensors, write_tensors
from headscope.sae.io import load_sae
from headscope.sae.options import TrainOptions
from headscope.sae.store import CacheSource, cache_activations
from headscope.sae.train import run_train
from headscope.testing.tiny import tiny_model

from sae_helpers import small_corpus

OPTS = dict(n_tokens=12288, batch_size=256, buffer_tokens=2048, expansion=2, warmup_steps=5, checkpoint_every=7)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama_gqa")


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk"])
def test_resume_equals_uninterrupted(tmp_path, model, arch):
    corpus = small_corpus(tmp_path)
    opts = dict(OPTS, corpus=corpus, architecture=arch, k=4, l1_coeff=0.5,
                resample_every=10 if arch == "standard" else 0)
    a = RunDir(tmp_path / "a", model.identity())
    full = run_train(model, a, TrainOptions(layer=1, **opts), progress=False)
    b = RunDir(tmp_path / "b", model.identity())
    part = run_train(model, b, TrainOptions(layer=1, **opts), progress=False, stop_at_step=17)  # a kill
    assert part["stopped_at_step"] == 17 and not (tmp_path / "b/sae/L1/cfg.json").exists()
    resumed = run_train(model, b, TrainOptions(layer=1, **opts), progress=False)
    wa = read_tensors(tmp_path / "a/sae/L1/sae_weights.safetensors")
    wb = read_tensors(tmp_path / "b/sae/L1/sae_weights.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert resumed["n_steps"] == full["n_steps"] == 48
    sae = load_sae(tmp_path / "a/sae/L1", model, layer=1)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.d_sae), atol=1e-5)
    h = [r for r in full["history"] if "mse" in r]
    assert h[-1]["mse"] < h[0]["mse"]  # the loss went down
    # a checkpoint of other options is not resumed: training starts over (the stage contract decides reruns)
    run_train(model, b, TrainOptions(layer=1, **dict(opts, lr=5e-3), name="x"), progress=False, stop_at_step=3)
    other = run_train(model, b, TrainOptions(layer=1, **dict(opts, lr=9e-3), name="x"), progress=False)
    assert other["config"]["lr"] == 9e-3 and other["n_steps"] == 48


def test_cache_equals_streaming_and_cache_errors(tmp_path, model):
    corpus = small_corpus(tmp_path)
    tc = TokenCorpus(model, corpus, seq_len=128, progress=False)
    man = cache_activations(model, tc, [1, 2], tmp_path / "cache", max_tokens=8128, shard_tokens=2048, progress=False)
    assert man["shards"] == 4 and man["layers"] == [1, 2]
    opts = dict(OPTS, corpus=corpus, n_tokens=4096, architecture="topk", k=4)
    run_train(model, RunDir(tmp_path / "a", model.identity()), TrainOptions(layer=2, **opts), progress=False)
    run_train(model, RunDir(tmp_path / "b", model.identity()),
              TrainOptions(layer=2, cache=str(tmp_path / "cache"), **opts), progress=False)
    wa = read_tensors(tmp_path / "a/sae/L2/sae_weights.safetensors")
    wb = read_tensors(tmp_path / "b/sae/L2/sae_weights.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HeadscopeError, match="empty"):
        CacheSource(tmp_path / "empty", [1])
    with pytest.raises(HeadscopeError, match="not for|not \\["):
        CacheSource(tmp_path / "cache", [0])
    with pytest.raises(HeadscopeError, match="not for"):
        CacheSource(tmp_path / "cache", [1], tiny_model("qwen2", seed=3))


def test_disk_full_while_caching_leaves_no_corrupt_shard(tmp_path, model, monkeypatch):
    import headscope.runs as runs
    tc = TokenCorpus(model, small_corpus(tmp_path), seq_len=128, progress=False)
    real = runs.save_file
    calls = {"n": 0}

    def flaky(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)   # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(runs, "save_file", flaky)
    with pytest.raises(HeadscopeError, match="disk full .* 2 complete shards kept"):
        cache_activations(model, tc, [1], tmp_path / "c", max_tokens=8128, shard_tokens=2048, progress=False)
    assert read_json(tmp_path / "c/manifest.json")["shards"] == 2
    assert sorted(p.name for p in (tmp_path / "c/L1").iterdir()) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    monkeypatch.setattr(runs, "save_file", real)
    man = cache_activations(model, tc, [1], tmp_path / "c", max_tokens=8128, shard_tokens=2048, progress=False)
    assert man["shards"] == 4


def test_nan_activations_stop_with_the_step(tmp_path, model):
    tc = TokenCorpus(model, small_corpus(tmp_path), seq_len=128, progress=False)
    cache_activations(model, tc, [1], tmp_path / "c", max_tokens=4096, shard_tokens=2048, progress=False)
    p = tmp_path / "c/L1/shard_00001.safetensors"
    z = read_tensors(p)["z"]
    z[:, 3] = float("nan")
    write_tensors(p, {"z": z})
    run = RunDir(tmp_path / "r", model.identity())
    # shard 1 is read from step 7 on (2032 rows per shard // 256 = 7 batches per block)
    with pytest.raises(HeadscopeError, match="non-finite z activations at layer 1 in the batch of step 7"):
        run_train(model, run, TrainOptions(layer=1, cache=str(tmp_path / "c"), **dict(OPTS, n_tokens=4096)),
                  progress=False)
    assert not (tmp_path / "r/sae/L1/cfg.json").exists()


def test_bad_options(tmp_path, model):
    run = RunDir(tmp_path / "r", model.identity())
    with pytest.raises(HeadscopeError, match="layer 7 is out of range"):
        run_train(model, run, TrainOptions(layer=7), progress=False)
    with pytest.raises(HeadscopeError, match="batch-size must be at least 1"):
        run_train(model, run, TrainOptions(layer=1, batch_size=0), progress=False)
    with pytest.raises(HeadscopeError, match="cannot train SAE architecture 'gated'"):
        run_train(model, run, TrainOptions(layer=1, architecture="gated"), progress=False)
    with pytest.raises(HeadscopeError, match="matryoshka widths must increase"):
        run_train(model, run, TrainOptions(layer=1, architecture="matryoshka_batchtopk", matryoshka_widths="20,10",
                                           corpus=small_corpus(tmp_path)), progress=False)
    with pytest.raises(HeadscopeError, match="exceeds"):
        run_train(model, run, TrainOptions(layer=1, corpus=small_corpus(tmp_path), batch_size=4096,
                                           buffer_tokens=1024), progress=False)


def test_cli_options_are_the_training_configuration():
    """`sae train`'s options are declared once: the stage's options class is what the trainer takes, and
    the architectures offered are the trainable ones."""
    import inspect
    import typing
    from headscope import registry
    from headscope.sae.model import TRAINABLE
    from headscope.sae.options import TrainOptions
    from headscope.sae.train import run_train
    assert registry.stage("sae.train").options is TrainOptions
    assert typing.get_type_hints(run_train)["opts"] is TrainOptions
    assert list(inspect.signature(run_train).parameters)[:4] == ["model", "run", "opts", "progress"]
    arch = typing.get_args(typing.get_type_hints(TrainOptions)["architecture"])
    assert set(arch) == set(TRAINABLE)
