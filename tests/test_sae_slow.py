"""The real default model (SmolLM2-135M): a small TopK SAE on layer 2's z, trained from a disk cache,
recovers > 0.8 of the KL (vs zero-ablation, lower 95 % CI bound) at L0 < 50 on held-out sequences
spread over ≥ 10 documents; the polysemanticity test's nulls stay at ≤ 10 %, it detects planted groups of 5 (cos 0.5) in ≥ 70 %
of plantings, and an untrained SAE of the same shape has no polysemantic head; the IOI example runs."""

import pytest
import torch

from headscope.data import TokenCorpus
from headscope.runs import RunDir
from headscope.sae.store import cache_activations

pytestmark = pytest.mark.slow

LAYER = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from headscope.models.load import load_model
    from headscope.sae.options import TrainOptions
    from headscope.sae.train import run_train
    model = load_model("default")
    root = tmp_path_factory.mktemp("sae_slow")
    cache_activations(model, TokenCorpus(model), [LAYER], root / "cache", max_tokens=32512, shard_tokens=16384,
                      progress=False)
    run = RunDir(root / "run", model.identity())
    res = run_train(model, run, TrainOptions(layer=LAYER, architecture="topk", k=32, expansion=2, batch_size=512,
                                             n_tokens=49152, lr=2e-3, warmup_steps=10, cache=str(root / "cache")),
                    progress=False)
    return model, run, res


def test_kl_recovered_with_ci_above_080_at_l0_below_50(trained):
    from headscope.sae.evaluate import run_eval
    from headscope.sae.options import EvalOptions
    model, run, res = trained
    run_eval(model, run, EvalOptions(name=f"L{LAYER}", n_tokens=2048, batch_size=4, mean_tokens=4096, n_boot=1000),
             progress=False)
    from headscope.runs import read_json
    ev = read_json(run / "sae" / f"L{LAYER}" / "eval.json")  # the stage returns a small summary; all is here
    assert ev["n_tokens"] >= 2000 and ev["n_documents"] >= 10
    assert ev["l0"] < 50
    kl = ev["recovered"]["kl_recovered_zero"]
    assert kl["meaningful"] and kl["ci"][0] > 0.8, kl
    assert ev["kl_sae"] < ev["kl_mean_ablation"] < ev["kl_zero_ablation"]
    assert ev["fve"] > 0.5


def test_polysemanticity_nulls_on_real_model(trained):
    from headscope.sae.analysis import polysemanticity, run_analysis
    from headscope.sae.options import AnalysisOptions
    from headscope.sae.model import AttnSAE
    model, run, _ = trained
    res = run_analysis(model, run, AnalysisOptions(name=f"L{LAYER}", n_null=100), progress=False)
    assert all(v <= 0.1 for v in res.null_polysemantic_frac.values()), res.null_polysemantic_frac
    by = res.power["by_group_size"]            # the test's power: tight planted groups of 5 are seen
    assert by["5"]["rate"] >= 0.7 and by["5"]["rate"] > by["2"]["rate"], by
    from headscope.sae.io import load_sae
    sae = load_sae(run.path / "sae" / f"L{LAYER}", model)
    control = polysemanticity(model, AttnSAE(sae.cfg, seed=777), n_null=100, seed=3)
    assert control["summary"]["polysemantic_frac"] == 0.0


def test_ioi_example_runs(trained):
    from headscope.sae.ioi import ioi_prompts, run_ioi
    from headscope.sae.options import IoiOptions
    model, run, _ = trained
    ps = ioi_prompts(model, 10)
    assert {p["order"] for p in ps} == {"ABBA", "BABA"}
    assert all(p["text"].count(p["s"]) == 2 and p["text"].count(p["io"]) == 1 for p in ps)
    res = run_ioi(model, run, IoiOptions(name=f"L{LAYER}", n_prompts=20, max_features=6), progress=False)
    assert res["logit_diff_clean"] > 0          # the model prefers the indirect object
    assert res["n_live_features"] > 0 and len(res["features"]) == 6
    assert all(abs(f["delta_abba"] + f["delta_baba"] - 2 * f["delta_logit_diff"]) < 1e-4 for f in res["features"])
    # the variant passes resume at the SAE's layer: the clean one must be the plain model's logit difference
    tok, diffs = model.tokenizer, []
    for p in ioi_prompts(model, 20):
        ids = torch.tensor([[model.bos_id] + tok(p["text"], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            lg = model.hf(input_ids=ids).logits[0, -1].float()
        io_, s_ = (tok(" " + p[k], add_special_tokens=False)["input_ids"][0] for k in ("io", "s"))
        diffs.append(float(lg[io_] - lg[s_]))
    assert res["logit_diff_clean"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-3)
