"""Head scores against a direct computation from the model's own attention weights."""

import json

import numpy as np
import pytest
import torch

from headscope.heads.scores import (prefix_induction_examples, prefix_induction_scores, repeat_scores,
                                    repeated_random_tokens, run_head_scores)
from headscope.runs import RunDir
from headscope.testing import tiny_model


def _eager_attn(m, ids):
    cur = m.hf.config._attn_implementation
    m.hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return [a.numpy() for a in m.hf(ids, output_attentions=True).attentions]
    finally:
        m.hf.set_attn_implementation(cur)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_repeat_scores_match_numpy(family):
    m = tiny_model(family)
    half = 10
    got = repeat_scores(m, n_seqs=6, half_len=half, batch_size=4, progress=False)
    att = _eager_attn(m, repeated_random_tokens(m, 6, half))
    for layer, a in enumerate(att):
        ind = np.mean([a[:, :, t, t - half + 1] for t in range(half + 1, 2 * half + 1)], axis=0).mean(0)
        dup = np.mean([a[:, :, t, t - half] for t in range(half + 1, 2 * half + 1)], axis=0).mean(0)
        prev = np.mean([a[:, :, t, t - 1] for t in range(1, 2 * half + 1)], axis=0).mean(0)
        np.testing.assert_allclose(got["induction"][layer].numpy(), ind, atol=1e-5)
        np.testing.assert_allclose(got["duplicate_token"][layer].numpy(), dup, atol=1e-5)
        np.testing.assert_allclose(got["prev_token"][layer].numpy(), prev, atol=1e-5)


def test_random_sequences_repeat_and_avoid_special_tokens():
    m = tiny_model("gpt2")
    s = repeated_random_tokens(m, 4, 7)
    assert s.shape == (4, 15) and (s[:, 0] == m.bos_id).all()
    assert torch.equal(s[:, 1:8], s[:, 8:])
    assert not (s[:, 1:] == m.tokenizer.eos_token_id).any()


def test_prefix_induction_examples_and_scores():
    m = tiny_model("neox_sequential")
    toks, dest, src = prefix_induction_examples(m, 3, 5, seq_len=64)
    for b in range(5):
        j, i = dest[b] - 2, src[b] - 3
        assert torch.equal(toks[b, j:j + 3], toks[b, i:i + 3]) and j > i + 3
    sc = prefix_induction_scores(m, [1, 2], n_examples=5, seq_len=64, batch_size=3, progress=False)
    att = _eager_attn(m, toks)
    ref = np.stack([a[np.arange(5), :, dest.numpy(), src.numpy()].mean(0) for a in att])
    # the scorer regenerates the same examples from the seed (seq_len 64 here)
    sc3 = prefix_induction_scores(m, [3], n_examples=5, seq_len=64, batch_size=2, progress=False)
    np.testing.assert_allclose(sc3[0].numpy(), ref, atol=1e-5)
    assert sc.shape == (2, m.n_layers, m.n_heads) and torch.all((sc >= 0) & (sc <= 1))


def test_run_writes_artifacts(tmp_path):
    from headscope.heads.instrument import ScoreOptions
    m = tiny_model("gpt2")
    run = RunDir(tmp_path / "run", m.identity())
    doc = run_head_scores(m, run, ScoreOptions(n_seqs=4, half_len=8, prefix_examples=4, prefix_lengths=[1, 2]),
                          progress=False)
    out = tmp_path / "run" / "heads"
    for f in ("scores.json", "scores.safetensors", "induction.png", "prev_token.png", "duplicate_token.png",
              "prefix_induction.png"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "scores.json").read_text())
    assert len(saved["scores"]["induction"]) == m.n_layers and len(saved["scores"]["induction"][0]) == m.n_heads
    assert saved == json.loads(json.dumps(doc))
    assert not list(out.glob("*.tmp*")), "no temporary file left behind"
