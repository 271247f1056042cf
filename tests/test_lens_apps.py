"""The Attention Lens applications against their controls (issue 24): steering through a head vs a random
direction and the residual stream, the prompt-set classifier vs its baselines, bias localisation vs a
frequency-matched control list — on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats as st

from headscope.cli import main
from headscope.errors import HeadscopeError
from headscope.lens.classifier import auroc, bag_of_words, compare, folds_of, read_prompt_file, reader_features
from headscope.lens.lenses import LensBank, LensConfig
from headscope.lens.localise import localise, matched_controls
from headscope.lens.steer_eval import matched_reference, measure, steer_eval, unit_directions
from headscope.testing.tiny import save_tiny_model, tiny_model

SITE = (1, 2)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama_gqa")


def _prompts(model, n, S=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.tensor([model.bos_id]), torch.randint(1, 512, (S,), generator=g)]) for _ in range(n)]


def test_steering_a_token_direction_beats_random_of_the_same_norm(model):
    """Head 1.2 made to write W_U[t] (and its identity lens' direction, the same up to scale) raises
    log p(t) at the next position, beyond a random direction of the same norm (BH); the random
    direction's effect is centred on zero; the residual-stream reference is measured beside it."""
    bank = LensBank(model, [SITE], LensConfig(kind="affine", norm=False))
    pr = _prompts(model, 6)
    tokens = list(range(100, 110))
    out = steer_eval(model, pr[:4], pr[4:], tokens, [SITE], [2.0, 8.0], [0.25, 1.0], new_tokens=3, bank=bank)
    curves = out["curves"]["1.2"]
    big = {d: curves[d][1] for d in ("unembed", "lens", "random")}
    assert big["unembed"]["dlogp_ci"][0] > 0 and big["lens"]["dlogp_ci"][0] > 0
    assert big["random"]["dlogp_ci"][0] < 0.5 * big["unembed"]["dlogp"]
    assert abs(big["random"]["dlogp"]) < 0.25 * big["unembed"]["dlogp"]
    rows = {(r["direction"], r["strength"]): r for r in out["tests"]}
    assert rows[("unembed", 8.0)]["passes"] and rows[("lens", 8.0)]["passes"]
    assert curves["random"][1]["kl"] > 0 and curves["resid"][1]["kl"] > 0  # the control has a cost too
    # stronger edits steer more and cost more
    assert curves["unembed"][1]["dlogp"] > curves["unembed"][0]["dlogp"] and curves["unembed"][1]["kl"] > curves["unembed"][0]["kl"]


def test_measure_matches_a_hand_written_hook(model):
    """Δ log p of the target from :func:`measure` equals adding the vector by a plain forward hook on the
    HF output projection (independent of headscope's intervention code)."""
    pr = _prompts(model, 3, seed=1)
    tokens = [120, 121]
    D = unit_directions(model, *SITE, tokens, "unembed") * 3.0
    m = measure(model, pr[:2], pr[2:], tokens, *SITE, D, new_tokens=1)
    mod = model.block_module(SITE[0], model.arch.o_proj)
    for i, t in enumerate(tokens):
        vals = []
        for ids in pr[:2]:
            h = mod.register_forward_hook(lambda _m, _a, out, v=D[i]: out + v)
            try:
                with torch.no_grad():
                    lg = model.hf(ids[None]).logits[0, -1].float()
            finally:
                h.remove()
            vals.append(float(torch.log_softmax(lg, -1)[t]) / np.log(2))
        assert m["logp"][i] == pytest.approx(np.mean(vals), abs=1e-4)


def test_residual_reference_is_the_head_edit_at_the_same_norm(model):
    """Adding a constant vector to a head's output is adding it to the residual stream after that
    layer's attention: the reference at the same absolute norm gives the same numbers; the matched-cost
    comparison interpolates the reference's curve."""
    pr = _prompts(model, 4, seed=2)
    tokens = [130, 131, 132]
    from headscope.lens.steer_eval import mean_norms
    hn, rn = mean_norms(model, pr, *SITE)
    out = steer_eval(model, pr[:2], pr[2:], tokens, [SITE], [4.0], [4.0 * hn / rn], new_tokens=2)
    a, b = out["curves"]["1.2"]["unembed"][0], out["curves"]["1.2"]["resid"][0]
    assert a["dlogp"] == pytest.approx(b["dlogp"], abs=1e-4) and a["kl"] == pytest.approx(b["kl"], abs=1e-5)
    assert out["tests"][0]["direction"] == "unembed" and out["tests"][0]["vs_resid"] is None  # not compared with itself
    curve = [{"kl": 1.0, "dlogp": 2.0}, {"kl": 3.0, "dlogp": 3.0}]
    assert matched_reference(curve, 0.5) == pytest.approx(1.0) and matched_reference(curve, 2.0) == pytest.approx(2.5)
    assert matched_reference(curve, 4.0) is None


def test_steering_tests_are_bh_adjusted(model):
    """``passes`` is Benjamini–Hochberg over every (head, direction, strength) row, computed here by hand
    from the p-values (and the p-values are paired two-sided t tests over tokens, checked with scipy)."""
    pr = _prompts(model, 4, seed=3)
    tokens = list(range(140, 146))
    bank = LensBank(model, [(1, 0), (2, 3)], LensConfig(kind="affine", norm=False))
    out = steer_eval(model, pr[:2], pr[2:], tokens, [(1, 0), (2, 3)], [0.05, 6.0], [1.0], new_tokens=1, bank=bank)
    p = np.array([r["p_value"] for r in out["tests"]])
    n = len(p)
    order = np.argsort(p)
    adj = np.minimum.accumulate((p[order] * n / np.arange(1, n + 1))[::-1])[::-1]
    expect = np.zeros(n, bool)
    expect[order] = adj <= 0.05
    expect &= np.array([r["diff"] > 0 for r in out["tests"]])
    assert [r["passes"] for r in out["tests"]] == expect.tolist()
    r = out["tests"][0]
    pt = out["per_token"][r["head"]]
    diff = np.array(pt[r["direction"]][0]["logp"]) - np.array(pt["random"][0]["logp"])
    assert r["p_value"] == pytest.approx(st.ttest_1samp(diff, 0).pvalue, rel=1e-6)
    assert len(out["tests"]) == 2 * 2 * 2 and any(r["passes"] for r in out["tests"])


def test_classifier_on_two_noise_sets_is_at_chance(model):
    """Two prompt sets drawn from one distribution: every classifier's held-out AUROC CI covers 0.5.
    Two sets that differ by a word: bag-of-words separates them."""
    bank = LensBank(model, [(1, 0), (2, 3)], LensConfig(kind="affine"))
    g = np.random.default_rng(0)
    words = ["value", "object", "function", "class", "module", "method", "type", "list", "string", "file"]

    def sent(extra=""):
        return " ".join(g.choice(words, 6)) + extra
    a, b = [sent() for _ in range(24)], [sent() for _ in range(24)]
    from headscope.lens.apply import resolve_token_list
    tok, _ = resolve_token_list(model, ["value", "type"])
    feats = {"lens": reader_features(model, bank, a + b, tok, 5, "lens"),
             "unembed": reader_features(model, bank, a + b, tok, 5, "unembed"),
             "random_heads": reader_features(model, bank, a + b, tok, 5, "random_heads"),
             "bag_of_words": bag_of_words(model, a + b)}
    y = np.array([1] * 24 + [0] * 24)
    res = compare(feats, y, reps=400)
    for name, v in res["auroc"].items():
        assert v["ci"][0] < 0.5 < v["ci"][1], (name, v)
    assert not any(v["lens_better"] for v in res["vs_lens"].values())
    c = [sent(" exception") for _ in range(24)]
    res2 = compare({"bag_of_words": bag_of_words(model, a + c)}, y, reps=200)
    assert res2["auroc"]["bag_of_words"]["ci"][0] > 0.8


def test_auroc_and_grouped_folds():
    y = np.array([1, 1, 0, 0, 1, 0])
    s = np.array([0.9, 0.8, 0.1, 0.85, 0.5, 0.5])
    # independent: the fraction of (positive, negative) pairs ranked right, ties half
    pairs = [(1.0 if sp > sn else 0.5 if sp == sn else 0.0) for sp in s[y == 1] for sn in s[y == 0]]
    assert auroc(s, y) == pytest.approx(np.mean(pairs))
    groups = np.array(["a", "a", "b", "b", "c", "c"])
    f = folds_of(y, groups, 5, 0)
    for g in "abc":  # a source is never split across folds
        assert len(set(f[groups == g])) == 1
    assert len(set(f)) == 3


def test_prompt_files_sources_and_builtin_sets(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("# a comment\n# source: one\nfirst\nsecond\n\n# source: two\nthird\n")
    prompts, src = read_prompt_file(str(p))
    assert prompts == ["first", "second", "third"] and src == ["one", "one", "two"]
    inj, s1 = read_prompt_file("builtin:injection")
    orr, s2 = read_prompt_file("builtin:ordinary")
    assert len(inj) == len(orr) == 40 and s1 == s2 and len(set(s1)) == 8
    assert all(abs(len(a) - len(b)) <= 0.35 * len(a) for a, b in zip(inj, orr))  # same form, about the same length
    with pytest.raises(HeadscopeError, match="unknown built-in"):
        read_prompt_file("builtin:nope")


def test_localisation_needs_to_beat_a_frequency_matched_control(model):
    """Control tokens are disjoint from the list, distinct, and close in frequency; a head whose list rate
    beats the control's is localised, one at its control's rate is not, after BH; the p-value is the
    one-sided t test over prompts (scipy)."""
    freq = np.random.default_rng(0).integers(0, 1000, model.d_vocab)
    listed = [50, 60, 70, 80]
    ctrl = matched_controls(model, listed, freq, seed=0)
    assert len(set(ctrl)) == 4 and not set(ctrl) & set(listed)
    lf = np.log1p(freq)
    pairs = list(zip(sorted(listed, key=lambda t: -freq[t]), ctrl))  # controls come in the list's frequency order
    assert all(abs(lf[c] - lf[t]) < 0.05 for t, c in pairs), [(freq[t], freq[c]) for t, c in pairs]
    text = model.token_str(list(range(model.d_vocab)))
    assert all(text[c][:1].isspace() == text[t][:1].isspace() for t, c in pairs)  # same form: leading space or not
    g = torch.Generator().manual_seed(0)
    P = 30
    control = torch.rand(P, 3, generator=g) * 0.2
    hits = control + torch.randn(P, 3, generator=g) * 0.05
    hits[:, 0] += 0.15  # head 0 reads the list beyond its control
    res = localise(hits, control, ["1.0", "1.1", "1.2"])
    assert res["per_head"]["1.0"]["localised"] and res["n_localised"] == 1
    d = (hits - control)[:, 1].double().numpy()
    assert res["per_head"]["1.1"]["p_value"] == pytest.approx(st.ttest_1samp(d, 0, alternative="greater").pvalue,
                                                              rel=1e-6)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("llama_gqa", tmp_path_factory.mktemp("tinyllama_apps"))


def test_steer_eval_and_scan_end_to_end(tmp_path, model_dir, capsys):
    """``lens steer-eval`` writes its table and typed result (reused when fresh), reaches the atlas data;
    ``lens scan`` reports localisation against the control list and the classifier against its
    baselines; bad input is a one-line error and writes nothing."""
    from headscope.lens.atlas_data import atlas_data
    out = str(tmp_path / "run")
    common = ["--model", str(model_dir), "--out", out]
    assert main(["lens", "steer-eval", *common, "--heads", "1.0"]) == 2  # no lenses yet
    assert "lens train" in capsys.readouterr().err and not (tmp_path / "run/lens/steer_eval.json").exists()
    assert main(["lens", "train", *common, "--layers", "1-2", "--heads", "0,3", "--tokens", "0", "--init-tokens",
                 "256", "--seq-len", "32", "--batch-size", "2"]) == 0
    words = tmp_path / "words.txt"
    words.write_text("the\nof\nis\nto\nin\nvalue\nobject\nclass\n")
    args = ["lens", "steer-eval", *common, "--heads", "1.0,2.3", "--tokens", str(words), "--n-tokens", "4",
            "--n-prompts", "2", "--n-cost-prompts", "1", "--prompt-len", "8", "--new-tokens", "2",
            "--strengths", "1", "4", "--resid-strengths", "0.5"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "beat the random direction" in text and "resid" in text
    se = json.loads((tmp_path / "run/lens/steer_eval.json").read_text())
    assert se["heads"] == ["1.0", "2.3"] and len(se["tests"]) == 2 * 2 * 2
    assert set(se["curves"]["1.0"]) == {"unembed", "lens", "random", "resid"}
    rec = json.loads((tmp_path / "run/stages/lens.steer-eval.json").read_text())
    assert rec["result"]["n_tests"] == 8 and set(rec["result"]["per_head"]) == {"1.0", "2.3"}
    prompts = tmp_path / "few.txt"
    prompts.write_text("one prompt only\n")
    assert main([*args, "--prompts", str(prompts)]) == 2
    assert "need 3" in capsys.readouterr().err
    assert main(["lens", "eval", *common, "--tokens", "128"]) == 0
    a = tmp_path / "a.txt"
    a.write_text("# source: s1\nThe value of the object is\nthe type of the function\n# source: s2\n"
                 "of the class the module\nthe name of the attribute\n# source: s3\nthe list of the items\none of the keys\n")
    b = tmp_path / "b.txt"
    b.write_text("# source: s1\nRaise an error when\nReturn a new set\n# source: s2\nPrint all lines\nCall it twice\n"
                 "# source: s3\nOpen a file now\nRead bytes until\n")
    assert main(["lens", "scan", *common, "--token-list", str(words), "--prompts", str(a), "--contrast", str(b)]) == 0
    text = capsys.readouterr().out
    assert "control list of the same corpus frequency" in text and "heads localised" in text
    assert "CV by source" in text and "random_heads" in text
    scan = json.loads((tmp_path / "run/lens/scan.json").read_text())
    assert scan["classifier"]["grouped_by"] == "source" and scan["classifier"]["n_groups"] == 3
    assert set(scan["localisation"]["per_head"]) == {"1.0", "1.3", "2.0", "2.3"}
    data = atlas_data(tmp_path / "run")
    assert "steering" in data["per_head"]["1.0"] and "localisation" in data["per_head"]["2.0"]
    assert set(data["per_head"]["1.0"]["applications"]) == {"steering", "localisation"}
    assert data["steer_eval"]["heads"] == ["1.0", "2.3"]
    json.dumps(data)


@pytest.mark.slow
def test_default_model_head_steering_beats_random():
    """SmolLM2-135M, head 18.6 (the strongest induction head): W_U[t] at 4× the head's output norm raises
    the target beyond a random direction of the same norm (BH), on held-out windows of the default corpus."""
    from headscope.lens.steer_eval import builtin_nouns, target_tokens, window_prompts
    from headscope.models import load_model
    m = load_model("default")
    success, cost = window_prompts(m, "default", 8, 2, 1, seed=0)
    tokens = target_tokens(m, builtin_nouns(), 6, seed=0)
    out = steer_eval(m, success, cost, tokens, [(18, 6)], [4.0], [0.25], new_tokens=1)
    row = out["tests"][0]
    assert row["direction"] == "unembed" and row["passes"], row
    c = out["curves"]["18.6"]
    assert abs(c["random"][0]["dlogp"]) < 0.25 * c["unembed"][0]["dlogp"]
