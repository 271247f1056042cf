"""On the real default model (SmolLM2-135M): the closed-form lenses of layer 18 beat both references
on held-out tokens — every head beats the unembedding baseline, most heads beat the null lens."""

from __future__ import annotations

import pytest

from headscope.lens.evaluate import run_eval
from headscope.lens.lenses import LensConfig
from headscope.lens.train import TrainConfig, run_train
from headscope.runs import RunDir


@pytest.mark.slow
def test_default_model_layer18_lenses_beat_both_references(tmp_path):
    from headscope.models.load import load_model
    m = load_model("default")
    run = RunDir(tmp_path / "run", m.identity())
    sites = [(18, h) for h in range(m.n_heads)]
    run_train(m, run, sites, LensConfig(), TrainConfig(init_tokens=8192, tokens=0), progress=False)
    out = run_eval(m, run, tokens=2048, transfer_tokens=0, progress=False)
    ph = out["per_head"]
    assert 5.0 < out["kl_null"] < 6.5  # the "about 5.6" for a constant prediction
    for v in ph.values():
        assert v["kl_lens"] < v["kl_unembed"] and v["kl_lens"] < v["kl_unembed_nonorm"]
    assert out["n_positive_gain"] >= 5, [round(v["gain"], 3) for v in ph.values()]
    assert out["median_gain"] > 0.1
