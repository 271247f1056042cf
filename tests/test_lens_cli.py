"""``headscope lens train|eval|show|scan|steer`` end to end on a tiny model saved as an HF directory,
plus the apply functions (token lists, classifier, steering) and the atlas data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from headscope.cli import main
from headscope.errors import HeadscopeError
from headscope.lens.apply import resolve_token_list, steer, Steer
from headscope.lens.classifier import fit_logistic
from headscope.lens.classifier import compare
from headscope.lens.atlas_data import atlas_data
from headscope.testing.tiny import save_tiny_model, tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("llama_gqa", tmp_path_factory.mktemp("tinyllama"))


def test_cli_end_to_end(tmp_path, model_dir, capsys):
    out = str(tmp_path / "run")
    common = ["--model", str(model_dir), "--out", out]
    assert main(["lens", "train", *common, "--layers", "1-2", "--heads", "0,3", "--tokens", "512", "--init-tokens",
                 "256", "--seq-len", "32", "--batch-size", "2"]) == 0
    info = json.loads((tmp_path / "run/lens/lenses.json").read_text())
    assert info["sites"] == [[1, 0], [1, 3], [2, 0], [2, 3]] and info["model"]["unembed_sha1"]
    assert main(["lens", "eval", *common, "--tokens", "256", "--transfer-tokens", "64"]) == 0
    text = capsys.readouterr().out
    assert "heads informative (one-sided test, Benjamini-Hochberg q = 0.05)" in text and "control lens" in text
    ev = json.loads((tmp_path / "run/lens/eval.json").read_text())
    assert set(ev["per_head"]) == {"1.0", "1.3", "2.0", "2.3"}
    assert main(["lens", "show", *common, "The cat sat", "--heads", "1.0,2.*", "--show-uninformative", "-k", "3"]) == 0
    text = capsys.readouterr().out
    assert "head 1.0" in text and "lens" in text
    # a head without a lens, an empty prompt: one-line errors (exit 2)
    assert main(["lens", "show", *common, "The cat", "--heads", "1.1"]) == 2
    assert "no lens trained for head(s) 1.1" in capsys.readouterr().err
    assert main(["lens", "show", *common, ""]) == 2
    assert "empty prompt" in capsys.readouterr().err
    assert main(["lens", "show", *common, "x", "--heads", "1.9"]) == 2
    assert "out of range" in capsys.readouterr().err
    words = tmp_path / "words.txt"
    words.write_text("the\nof\nsupercalifragilistic\n")
    a = tmp_path / "a.txt"
    a.write_text("\n".join(["The value of the object is", "the type of the function", "of the class the module",
                            "the name of the attribute", "the list of the items", "one of the keys"]) + "\n")
    b = tmp_path / "b.txt"
    b.write_text("\n".join(["Raise an error when", "Return a new set", "Print all lines", "Call it twice",
                            "Open a file now", "Read bytes until"]) + "\n")
    assert main(["lens", "scan", *common, "--token-list", str(words), "--prompts", str(a), "--contrast", str(b)]) == 0
    cap = capsys.readouterr()
    assert "supercalifragilistic" in cap.err and "held-out AUROC" in cap.out and "bag_of_words" in cap.out
    scan = json.loads((tmp_path / "run/lens/scan.json").read_text())
    assert len(scan["heatmap_hit_rate"]) == 3 and scan["heatmap_hit_rate"][1][0] is not None
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["lens", "scan", *common, "--token-list", str(empty), "--prompts", str(a)]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["lens", "steer", "--model", str(model_dir), "--out", out, "The cat", "--add", "1.0:the:8",
                 "--ablate", "2.3", "--new-tokens", "4", "--from-lens"]) == 0
    text = capsys.readouterr().out
    assert "before:" in text and "after:" in text
    data = atlas_data(tmp_path / "run")
    assert set(data["per_head"]) == {"1.0", "1.3", "2.0", "2.3"} and "scan" in data and "transfer" in data
    for name, v in data["per_head"].items():
        assert ("top_tokens" in v) == bool(v["informative"])
    json.dumps(data)


def test_token_list_policies():
    m = tiny_model("gpt2")
    ids, rep = resolve_token_list(m, ["the", "supercalifragilistic"], "first")
    assert rep["multi_token"] == ["supercalifragilistic"] and rep["used_first_token"] == ["supercalifragilistic"]
    first = m.tokenizer(" supercalifragilistic", add_special_tokens=False)["input_ids"][0]
    assert first in ids
    ids2, rep2 = resolve_token_list(m, ["the", "supercalifragilistic"], "skip")
    assert first not in ids2 and rep2["skipped"] == ["supercalifragilistic"]
    with pytest.raises(HeadscopeError, match="no word of the token list"):
        resolve_token_list(m, ["supercalifragilistic"], "skip")


def test_logistic_regression_matches_numpy_and_separates():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(80, 3, generator=g)
    y = (X[:, 1] + 0.3 * torch.randn(80, generator=g) > 0).float()
    w, b = fit_logistic(X, y, l2=1e-2)
    # independent check: gradient of the same objective is zero at the optimum (numpy)
    Xn, yn, wn = X.double().numpy(), y.double().numpy(), w.numpy()
    p = 1 / (1 + np.exp(-(Xn @ wn + float(b))))
    grad = Xn.T @ (p - yn) / len(yn) + 2e-2 * wn
    assert np.abs(grad).max() < 1e-4
    res = compare({"lens": X, "other": X[:, [0, 2]]}, y.numpy())
    assert res["auroc"]["lens"]["auroc"] >= 0.9 and res["vs_lens"]["other"]["lens_better"]


def test_steer_ablation_changes_nothing_for_scale_one():
    m = tiny_model("gpt2")
    same = steer(m, "The value", [Steer(1, 0, "scale", None, 1.0)], n_tokens=3)
    assert same["before"] == same["after"]
    with pytest.raises(HeadscopeError, match="not a single token"):
        steer(m, "The value", [Steer(1, 0, "add", "supercalifragilistic", 2.0)], n_tokens=2)
