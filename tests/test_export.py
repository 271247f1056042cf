"""Exports, checked against the documented layouts: Neuronpedia's record types (field names copied from
hijohnnylin/neuronpedia utils/neuronpedia-utils/neuronpedia_utils/db_models/*.py) and SAELens' Hugging Face
layout (loaded back with SAELens itself)."""

import gzip
import json

import pytest
import torch

from headscope.cli import main
from headscope.errors import HeadscopeError
from headscope.explain.features import FeatureExplainOptions, FeatureScoreOptions, run_explain_features, \
    run_score_features
from headscope.export.hf import HFOptions, export_hf
from headscope.export.neuronpedia import NeuronpediaOptions, export_neuronpedia
from headscope.runs import RunDir, read_json
from headscope.sae.dashboards import run_dashboards
from headscope.sae.evaluate import run_eval
from headscope.sae.options import DashboardOptions, EvalOptions, TrainOptions
from headscope.sae.io import load_sae
from headscope.sae.train import run_train
from headscope.testing.tiny import tiny_model

from sae_helpers import small_corpus

# Neuronpedia's dataclasses, field by field (db_models/feature.py, activation.py, explanation.py, model.py, source.py)
NP_FEATURE = """modelId layer index creatorId createdAt maxActApprox hasVector vector vectorLabel
vectorDefaultSteerStrength hookName topkCosSimIndices topkCosSimValues neuron_alignment_indices neuron_alignment_values
neuron_alignment_l1 correlated_neurons_indices correlated_neurons_pearson correlated_neurons_l1
correlated_features_indices correlated_features_pearson correlated_features_l1 neg_str neg_values pos_str pos_values
frac_nonzero freq_hist_data_bar_heights freq_hist_data_bar_values logits_hist_data_bar_heights
logits_hist_data_bar_values decoder_weights_dist""".split()
NP_ACTIVATION = """id tokens index layer modelId maxValue maxValueTokenIndex minValue values creatorId dataSource
dataIndex dfaValues dfaTargetIndex dfaMaxValue createdAt lossValues logitContributions binMin binMax binContains
qualifyingTokenIndex""".split()
NP_EXPLANATION = """id modelId layer index description authorId embedding triggeredById typeName explanationModelName
notes createdAt""".split()
NP_MODEL = """id instruct creatorId displayNameShort displayName tlensId dimension visibility defaultSourceSetName
defaultSourceId inferenceEnabled layers neuronsPerLayer createdAt owner updatedAt website""".split()
NP_SOURCE = """id modelId setName creatorId hasDashboards inferenceEnabled inferenceHosts saelensConfig saelensRelease
saelensSaeId hfRepoId hfFolderId visibility defaultOfModelId hasUmap hasUmapLogSparsity hasUmapClusters num_prompts
num_tokens_in_prompt dataset notes createdAt""".split()


@pytest.fixture(scope="module")
def sae_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    model = tiny_model("gpt2")
    run = RunDir(tmp / "run", model.identity())
    run_train(model, run, TrainOptions(layer=1, corpus=small_corpus(tmp), n_tokens=8192, batch_size=256,
                                       buffer_tokens=2048, expansion=2, architecture="topk", k=4, seq_len=64),
              progress=False)
    run_eval(model, run, EvalOptions(name="L1", n_tokens=512, batch_size=4), progress=False)
    run_dashboards(model, run, DashboardOptions(name="L1", n_tokens=1024, batch_size=4), page_size=16, progress=False)
    run_explain_features(model, run, FeatureExplainOptions(sae="L1", features=6, n_explain=4, n_test=4, windows=200),
                         progress=False)
    run_score_features(model, run, FeatureScoreOptions(sae="L1"), progress=False)
    return model, run, tmp


def _jsonl_gz(folder):
    rows = []
    for f in sorted(folder.glob("batch-*.jsonl.gz")):
        rows += [json.loads(line) for line in gzip.decompress(f.read_bytes()).decode().splitlines()]
    return rows


def test_neuronpedia_layout_and_field_names(sae_run):
    model, run, tmp = sae_run
    res = export_neuronpedia(run, tmp / "np", NeuronpediaOptions(model_id="tiny-gpt2", batch_size=5, to=str(tmp / "np")))
    src = tmp / "np/tiny-gpt2/1-headscope-att"
    assert res["folder"] == str(src)
    feats, acts, expl = (_jsonl_gz(src / d) for d in ("features", "activations", "explanations"))
    idx = read_json(run / "sae/L1/dashboards/index.json")
    assert len(feats) == idx["alive"] == res["features"] and len(list((src / "features").glob("*.gz"))) >= 2
    for rows, names in ((feats, NP_FEATURE), (acts, NP_ACTIVATION), (expl, NP_EXPLANATION)):
        for r in rows:
            assert list(r) == names or set(r) == set(names), set(r) ^ set(names)
    for name, names in (("model.jsonl", NP_MODEL), ("source.jsonl", NP_SOURCE)):
        rec = json.loads((src / name).read_text())
        assert set(rec) == set(names), set(rec) ^ set(names)
    assert all(f["layer"] == "1-headscope-att" and f["modelId"] == "tiny-gpt2" for f in feats)
    # activations: the dashboard's values, with the max where the dashboard says the feature fired
    page = read_json(run / "sae/L1/dashboards/page_000.json")["features"]
    f0, rec = next(iter(page.items()))
    mine = [a for a in acts if a["index"] == f0]
    top = rec["examples"][0]
    a0 = next(a for a in mine if a["tokens"] == top["context"] and a["qualifyingTokenIndex"] == top["index"])
    assert a0["values"] == pytest.approx(top["acts"]) and a0["maxValue"] == pytest.approx(max(top["acts"]))
    assert a0["values"][a0["maxValueTokenIndex"]] == a0["maxValue"]
    assert len(mine) == len(rec["examples"]) + sum(len(q["examples"]) for q in rec["quantiles"])
    binned = [a for a in mine if a["binMin"] is not None]
    # a random sample's bin holds its own (qualifying) token's activation; the context may hold larger ones
    assert binned and all(a["binMin"] - 1e-3 <= a["values"][a["qualifyingTokenIndex"]] <= a["binMax"] + 1e-3
                          for a in binned)
    ex = read_json(run / "explain/features/L1/explanations_statistical.json")["features"]
    assert {e["index"] for e in expl} == set(ex) and all(e["typeName"] == "headscope-statistical" for e in expl)
    assert all(json.loads(e["notes"])["scores"]["statistical"]["detection"] for e in expl)
    with pytest.raises(HeadscopeError, match="exists"):
        export_neuronpedia(run, tmp / "np", NeuronpediaOptions(model_id="tiny-gpt2", to=str(tmp / "np")))


def test_hf_folder_loads_in_saelens(sae_run):
    from sae_lens import SAE
    model, run, tmp = sae_run
    res = export_hf(run, tmp / "repo", HFOptions(repo_id="me/tiny-attn-sae", to=str(tmp / "repo")))
    sae_id = res["sae_id"]
    assert sae_id == "blocks.1.attn.hook_z"
    d = tmp / "repo" / sae_id
    assert {p.name for p in d.iterdir()} == {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors",
                                             "explanations.json"}
    theirs = SAE.load_from_disk(str(d))
    ours = load_sae(run / "sae/L1", model)
    z = torch.randn(3, 4, model.n_heads, model.d_head)
    with torch.no_grad():
        assert torch.allclose(theirs.encode(z), ours.encode(z.reshape(3, 4, -1)), atol=1e-5)
    readme = (tmp / "repo/README.md").read_text()
    front = readme.split("---")[1]
    assert "library_name: saelens" in front and "- sparse-autoencoder" in front
    assert f'SAE.from_pretrained("me/tiny-attn-sae", "{sae_id}")' in readme
    ev = read_json(run / "sae/L1/eval.json")
    assert f"| l0 | {ev['l0']:.4g} |" in readme and "| detection |" in readme and "shuffled" in readme


def test_export_cli_errors(sae_run, capsys):
    model, run, tmp = sae_run
    assert main(["export", "hf", "--out", str(run.path), "--to", str(tmp / "repo2"), "--sae", "nope"]) == 2
    assert "no SAE 'nope'" in capsys.readouterr().err
    assert not (tmp / "repo2").exists()
    assert main(["export", "neuronpedia", "--out", str(run.path), "--to", str(tmp / "np2")]) == 0
    assert "features" in capsys.readouterr().out
