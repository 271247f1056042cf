"""SAE evaluation against independent computations: HF's own loss for the clean CE, a plain PyTorch
hook for zero-ablation, a perfect and a null reconstruction for the recovered scores, numpy FVE."""

import numpy as np
import pytest
import torch

from headscope.capture import capture
from headscope.data import TokenCorpus
from headscope.sae.evaluate import evaluate_sae
from headscope.sae.model import AttnSAE, SAEConfig
from headscope.testing.tiny import tiny_model

from sae_helpers import small_corpus


def _identity_sae(model, layer):
    """f = [ReLU(x), ReLU(−x)], x̂ = f·[I; −I]: reconstructs z exactly."""
    d = model.n_heads * model.d_head
    sae = AttnSAE(SAEConfig(d_in=d, d_sae=2 * d, n_heads=model.n_heads, d_head=model.d_head, layer=layer,
                            architecture="standard"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_recovered_scores_and_ce_against_independent(tmp_path, family):
    model = tiny_model(family)
    tc = TokenCorpus(model, small_corpus(tmp_path), seq_len=64, progress=False)
    mean = torch.zeros(model.n_heads, model.d_head)
    perfect = evaluate_sae(model, _identity_sae(model, 1), tc, n_tokens=512, batch_size=4, mean=mean, progress=False)
    assert perfect["ce_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    assert perfect["kl_sae"] == pytest.approx(0.0, abs=1e-6)
    assert perfect["fve"] == pytest.approx(1.0, abs=1e-5) and perfect["nmse"] < 1e-10
    # mean-ablation with a zero mean is zero-ablation
    assert perfect["ce_mean_ablation"] == pytest.approx(perfect["ce_zero_ablation"], rel=1e-6)
    # independent clean CE: the HF model's own loss; independent zero-ablation: a raw pre-hook
    ids = torch.stack(list(tc.batches("heldout", 4, max_tokens=512)))
    ids = ids.reshape(-1, ids.shape[-1])
    ce_hf = np.mean([model.hf(input_ids=b[None], labels=b[None]).loss.item() for b in ids])
    assert perfect["ce_clean"] == pytest.approx(ce_hf, rel=1e-4)
    o_proj = model.block_module(1, model.arch.o_proj)

    def zero_hook(mod, args):
        z = args[0].clone()
        z[:, 1:] = 0
        return (z,)
    h = o_proj.register_forward_pre_hook(zero_hook)
    try:
        with torch.no_grad():
            ce_zero = np.mean([model.hf(input_ids=b[None], labels=b[None]).loss.item() for b in ids])
    finally:
        h.remove()
    assert perfect["ce_zero_ablation"] == pytest.approx(ce_zero, rel=1e-4)
    # a null SAE (x̂ = 0) recovers nothing against zero-ablation
    null = _identity_sae(model, 1)
    with torch.no_grad():
        null.W_dec.zero_()
    res = evaluate_sae(model, null, tc, n_tokens=512, batch_size=4, mean=mean, progress=False)
    assert res["ce_recovered_zero"] == pytest.approx(0.0, abs=1e-4)
    assert res["kl_recovered_zero"] == pytest.approx(0.0, abs=1e-4)


def test_reconstruction_metrics_match_numpy(tmp_path):
    model = tiny_model("qwen2")
    tc = TokenCorpus(model, small_corpus(tmp_path), seq_len=64, progress=False)
    d = model.n_heads * model.d_head
    sae = AttnSAE(SAEConfig(d_in=d, d_sae=24, n_heads=model.n_heads, d_head=model.d_head, layer=2,
                            architecture="topk", k=3), seed=2)
    res = evaluate_sae(model, sae, tc, n_tokens=256, batch_size=2, splice=False, progress=False)
    xs = []
    for ids in tc.batches("heldout", 2, max_tokens=256):
        z = capture(model, ids, layers=[2], what=("z",))["z"][2][:, 1:]
        xs.append(z.reshape(-1, d))
    x = torch.cat(xs).double().numpy()
    with torch.no_grad():
        acts = sae.encode(torch.from_numpy(x).float())
        xh = sae.decode(acts).double().numpy()
    fve = 1 - ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert res["fve"] == pytest.approx(fve, rel=1e-4, abs=1e-5)
    assert res["l0"] == pytest.approx(float((acts > 0).sum(-1).float().mean()), rel=1e-6)
    assert res["nmse"] == pytest.approx(((x - xh) ** 2).sum() / (x ** 2).sum(), rel=1e-4)
    freq = (acts > 0).float().mean(0)
    assert res["dead_frac"] == pytest.approx(float((freq == 0).float().mean()))
    assert sum(res["density_hist"]["counts"]) == int((freq > 0).sum())
