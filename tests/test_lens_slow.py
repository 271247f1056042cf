"""On the real default model (SmolLM2-135M): the closed-form lenses of layer 18 are judged against a
control lens trained the same way on a scrambled head output. The control must read nothing (gain at
or below zero within its SE, not informative); most real heads must be informative under the BH rule,
each above the control by a clear margin. (Replaces the old can't-fail checks: a hard-coded range for
the null's KL, and "every lens beats the unembedding", which holds from a null start by construction.)"""

from __future__ import annotations

import pytest

from headscope.lens.evaluate import run_eval
from headscope.lens.lenses import LensConfig
from headscope.lens.options import EvalOptions, LensTrainConfig
from headscope.lens.train import run_train
from headscope.runs import RunDir


@pytest.mark.slow
def test_default_model_layer18_lenses_against_the_control_lens(tmp_path):
    from headscope.models.load import load_model
    m = load_model("default")
    run = RunDir(tmp_path / "run", m.identity())
    sites = [(18, h) for h in range(m.n_heads)]
    run_train(m, run, sites, LensConfig(), LensTrainConfig(init_tokens=8192, tokens=0), progress=False)
    out = run_eval(m, run, EvalOptions(tokens=2048), progress=False)
    c = out["control"]["control0"]
    assert c["gain"] <= (c["gain_se"] or 0.0), c
    assert c["p_value"] is not None and c["p_value"] > 0.05
    assert out["documents"] >= 8  # 16 windows spread over the held-out documents
    ph = out["per_head"]
    informative = [v for v in ph.values() if v["informative"]]
    assert len(informative) >= 5, [(k, round(v["gain"], 3), round(v["gain_se"], 3)) for k, v in ph.items()]
    for v in informative:
        assert v["gain"] - 2 * v["gain_se"] > c["gain"] + 2 * c["gain_se"]
