"""The atlas's Start-here list (headscope.atlas.highlights) from a synthetic run's artifacts.

The run directory is written by hand in each instrument's file format and read back through the
instruments' own ``atlas_data`` (via :func:`headscope.atlas.collect.collect`), so the list is tested on
exactly what a real build sees; the lens rule is checked against scipy (t test + BH) independently.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from scipy import stats

from headscope.atlas.build import build_atlas
from headscope.atlas.collect import collect
from headscope.atlas.highlights import highlights, uniform_reference
from headscope.runs import RunDir, write_json

L, H = 3, 4
IDENT = {"model": "synthetic", "n_layers": L, "n_heads": H, "d_model": 32, "d_vocab": 100}


def grid(vals: dict[str, float], default: float) -> list[list[float]]:
    return [[vals.get(f"{l}.{h}", default) for h in range(H)] for l in range(L)]


def write_scores(run: RunDir, half_len: int = 8) -> None:
    ind = grid({"2.1": 0.91, "1.3": 0.55, "2.2": 0.30}, 0.01)
    prev = grid({"0.2": 0.80, "1.0": 0.40}, 0.02)
    dup = grid({}, 0.0)
    write_json(run / "heads" / "scores.json", {
        "model": IDENT, "n_layers": L, "n_heads": H, "prefix_induction": None,
        "scores": {"induction": ind, "prev_token": prev, "duplicate_token": dup},
        "config": {"n_seqs": 4, "half_len": half_len, "prefix_examples": 0, "seed": 0, "layers": [0, 1, 2]}})


LENS = {  # head: (gain, gain_se) in bits/token
    "1.1": (0.50, 0.05),   # informative
    "2.0": (0.30, 0.04),   # informative
    "0.3": (2.00, 3.00),   # the largest gain, but not significant: must never be listed
    "2.3": (0.01, 0.20),
    "0.0": (-0.05, 0.05),
}
DF = 19


def write_lens(run: RunDir) -> None:
    per_head = {k: {"gain": g, "gain_se": se, "kl_lens": 1.0, "kl_null": 1.0 + g} for k, (g, se) in LENS.items()}
    write_json(run / "lens" / "eval.json", {
        "per_head": per_head, "df": DF, "q": 0.05, "tokens": 1000, "documents": DF + 1, "n_heads": len(LENS),
        "control": {"scrambled": {"source": "scrambled", "gain": 0.002, "gain_se": 0.01, "p_value": 0.4}}})


def write_sae(run: RunDir) -> None:
    folder = run / "sae" / "L1"
    write_json(folder / "cfg.json", {"architecture": "topk", "d_sae": 64, "k": 4,
                                     "metadata": {"headscope": {"layer": 1}}})

    def head(atts, poly=False, q=0.9, groups=1):
        return {"top_features": [{"feature": i, "attribution": a, "top_tokens": ["x"]} for i, a in enumerate(atts)],
                "n_groups": groups, "polysemantic": poly, "q_poly": q,
                "verdict": "polysemantic" if poly else "no structure beyond the null"}
    write_json(folder / "heads.json", {"heads": {
        "0": head([0.9, 0.8, 0.3]),                       # 2 features over half on 1.0
        "1": head([0.95, 0.2, 0.1]),                      # 1 (larger share, fewer features)
        "2": head([0.4, 0.3], poly=True, q=0.01, groups=3),
        "3": head([0.3], poly=False, q=0.2, groups=2),   # 2 groups but not significant: not listed
    }, "polysemantic_frac": 0.25, "null_polysemantic_frac": {"untrained": 0.0}})


def write_neurons(run: RunDir) -> None:
    neurons = [{"layer": 2, "neuron": n, "token": f"t{n}", "n_train": 10, "n_test": 5,
                "explain": ["0.1", "2.1"], "heads": {"0.1": {"frac_train": 0.5}, "2.1": {"frac_train": 0.4}}}
               for n in range(3)]
    write_json(run / "neurons" / "attribution.json", {"neurons": neurons, "pairs": []})
    pairs = []
    for i in range(3):  # head 0.1: significant on all 3 neurons; head 2.1 on one; head 0.2 pair not significant
        pairs.append({"neuron": i, "layer": 0, "head": 1, "name": "0.1", "effect": 0.02 + 0.01 * i, "q": 0.01,
                      "significant": True, "mean_drop_active": 0.03, "mean_drop_inactive": 0.0})
        pairs.append({"neuron": i, "layer": 2, "head": 1, "name": "2.1", "effect": 0.05, "q": 0.01 if i == 0 else 0.6,
                      "significant": i == 0, "mean_drop_active": 0.05, "mean_drop_inactive": 0.0})
    pairs.append({"neuron": 0, "layer": 0, "head": 2, "name": "0.2", "effect": 0.5, "q": 0.3, "significant": False})
    write_json(run / "neurons" / "ablation.json", {"pairs": pairs, "summary": {"pairs": len(pairs)}})


@pytest.fixture
def full_run(tmp_path):
    run = RunDir(tmp_path / "r", IDENT)
    write_scores(run)
    write_lens(run)
    write_sae(run)
    write_neurons(run)
    return run


def listed(hl):
    return [x["head"] for x in hl]


def test_lens_rule_matches_scipy():
    """The synthetic lens heads' informative set, recomputed independently (t test, BH at 0.05)."""
    names = list(LENS)
    p = stats.t.sf([LENS[n][0] / LENS[n][1] for n in names], DF)
    q = stats.false_discovery_control(p)
    assert {n for n, qq in zip(names, q) if qq <= 0.05} == {"1.1", "2.0"}


def test_full_run_order_and_reasons(full_run):
    from headscope.atlas.highlights import load_neuron_ablation
    sources = collect(full_run.path)["sources"]
    hl = highlights(sources, H, load_neuron_ablation(full_run.path))
    heads = listed(hl)
    assert len(heads) == len(set(heads)) <= 8
    # round robin: top induction, top prev-token, top lens, SAE polysemantic, SAE attribution, neurons, then 2nd ones
    assert heads == ["2.1", "0.2", "1.1", "1.2", "1.0", "0.1", "1.3", "2.0"]
    by = {x["head"]: x for x in hl}
    uni = uniform_reference("induction", 8)
    assert uni == pytest.approx(np.mean([1 / (t + 1) for t in range(9, 17)]))
    assert by["2.1"]["source"] == "heads" and by["2.1"]["reason"].startswith("induction score 0.91, highest of 12 heads")
    assert f"uniform attention {uni:.3f}, listed from 2×" in by["2.1"]["reason"] and "median 0.01" in by["2.1"]["reason"]
    assert by["1.3"]["reason"].startswith("induction score 0.55, 2nd highest of 12 heads")
    assert by["0.2"]["reason"].startswith("previous-token score 0.80, highest")
    assert by["1.1"]["source"] == "lens" and "0.500 ± 0.050 bits/token" in by["1.1"]["reason"]
    assert "2 of 5 lensed heads" in by["1.1"]["reason"] and "control lens 0.002" in by["1.1"]["reason"]
    assert by["1.2"]["source"] == "sae" and "3 feature groups" in by["1.2"]["reason"] and "q = 0.010" in by["1.2"]["reason"]
    assert by["1.0"]["reason"].startswith("SAE L1: 2 of its 3 top features put over half") and "1/4 = 0.25" in by["1.0"]["reason"]
    assert by["0.1"]["source"] == "neurons" and "for 3 of the 3 next-token neurons" in by["0.1"]["reason"]
    assert "mean effect +0.030" in by["0.1"]["reason"]
    # head 2.1 drives one neuron significantly too: not listed twice, its second finding is kept under "also"
    assert any("for 1 of the 3 next-token neurons" in a for a in by["2.1"]["also"])
    # never listed: the non-informative lens head with the largest gain, the SAE head whose groups are not
    # significant, the pair that failed BH (as a neuron finding)
    assert "0.3" not in heads and "1.3" not in [x["head"] for x in hl if x["source"] == "sae"]
    assert not any("neurons" in r for r in by["0.2"]["also"] + [by["0.2"]["reason"]])


def test_non_informative_lens_never_listed(tmp_path):
    run = RunDir(tmp_path / "r", IDENT)
    write_json(run / "lens" / "eval.json", {"per_head": {"0.0": {"gain": 3.0, "gain_se": 5.0},
                                                         "1.1": {"gain": 0.01, "gain_se": 0.1}}, "df": 9, "q": 0.05})
    sources = collect(run.path)["sources"]
    assert sources["lens"]["per_head"]["0.0"]["informative"] is False
    assert highlights(sources, H) == []


def test_empty_run(tmp_path):
    run = RunDir(tmp_path / "r", IDENT)
    assert highlights(collect(run.path)["sources"], H) == []
    assert highlights({}, H) == [] and highlights({}, H, {"pairs": []}) == []
    build_atlas(run.path, progress=False)
    assert index_page(run)["highlights"] == []


def index_page(run):
    text = (run.path / "atlas" / "data" / "index.js").read_text()
    m = re.fullmatch(r'window\.__atlas_page\("index",(.*)\);\n', text, re.S)
    return json.loads(m.group(1))


def test_heads_only_run_and_build(tmp_path):
    run = RunDir(tmp_path / "r", IDENT)
    write_scores(run)
    build_atlas(run.path, progress=False)
    hl = index_page(run)["highlights"]
    assert listed(hl) == ["2.1", "0.2", "1.3", "1.0"] and {x["source"] for x in hl} == {"heads"}
    # a score under twice uniform attention is no finding: with half_len 8 the previous-token reference is
    # 0.152 (bar 0.30: 1.0's 0.40 passes); with half_len 2 it is (1/2 + 1/3 + 1/4 + 1/5)/4 = 0.321 (bar 0.64)
    assert uniform_reference("prev_token", 2) == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4)
    write_scores(run, half_len=2)
    hl = highlights(collect(run.path)["sources"], H)
    assert listed(hl) == ["2.1", "0.2", "1.3"]


def test_all_heads_equal_lists_nothing(tmp_path):
    """A score that no head stands out on (all equal: none above the median) gives no highlight, nor
    does one whose top head is above the median but under twice uniform attention (an untrained model)."""
    run = RunDir(tmp_path / "r", IDENT)
    flat = grid({}, 0.2)
    write_json(run / "heads" / "scores.json", {"n_layers": L, "n_heads": H,
                                               "scores": {"induction": flat, "prev_token": flat},
                                               "config": {"half_len": 8}})
    assert highlights(collect(run.path)["sources"], H) == []
    near_uniform = grid({"0.0": 0.15}, 0.08)  # induction reference 0.0763 for half_len 8: 0.15 < 2 × 0.0763
    write_json(run / "heads" / "scores.json", {"n_layers": L, "n_heads": H, "scores": {"induction": near_uniform},
                                               "config": {"half_len": 8}})
    assert uniform_reference("induction", 8) == pytest.approx(np.mean([1 / (t + 1) for t in range(9, 17)]))  # 0.0763
    assert highlights(collect(run.path)["sources"], H) == []
