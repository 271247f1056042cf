"""SAELens on-disk format: round trip, parity with SAELens (encodings), loading SAELens-saved SAEs,
and refusing SAEs for another model, layer or width, or corrupt files."""

import json

import pytest
import torch

from headscope.errors import HeadscopeError
from headscope.sae.io import load_sae, save_sae
from headscope.sae.model import AttnSAE, SAEConfig
from headscope.testing.tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama_gqa")


def _trained(model, arch, seed=0):
    cfg = SAEConfig(d_in=model.n_heads * model.d_head, d_sae=48, n_heads=model.n_heads, d_head=model.d_head,
                    layer=1, architecture=arch, k=6, model=model.identity())
    sae = AttnSAE(cfg, seed=seed)
    with torch.no_grad():  # non-trivial biases so that their handling is tested
        sae.b_dec.normal_(0, 0.5)
        sae.b_enc.normal_(0, 0.1)
    return sae


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_saelens_loads_ours_with_same_encodings(tmp_path, model, arch):
    from sae_lens import SAE
    sae = _trained(model, arch)
    save_sae(sae, tmp_path / "s")
    cfg = json.loads((tmp_path / "s/cfg.json").read_text())
    assert cfg["reshape_activations"] == "hook_z" and cfg["metadata"]["sae_lens_version"]
    assert cfg["metadata"]["hook_name"] == "blocks.1.attn.hook_z"
    theirs = SAE.load_from_disk(str(tmp_path / "s"))
    z = torch.randn(2, 5, model.n_heads, model.d_head)      # hook_z shaped [B, S, H, Dh]
    with torch.no_grad():
        f_theirs = theirs.encode(z)
        rec_theirs = theirs.decode(f_theirs)
        f_ours = sae.encode(z.reshape(2, 5, -1))
    assert torch.allclose(f_theirs, f_ours, atol=1e-5)
    assert torch.allclose(rec_theirs.reshape(2, 5, -1), sae.decode(f_ours).detach(), atol=1e-5)
    back = load_sae(tmp_path / "s", model, layer=1)
    assert torch.equal(back.W_enc, sae.W_enc) and back.cfg.architecture == arch
    assert arch == "standard" or back.cfg.k == sae.cfg.k


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_we_load_saelens_saved(tmp_path, model, arch):
    from sae_lens import SAE, StandardSAEConfig, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    d_in = model.n_heads * model.d_head
    meta = SAEMetadata(hook_name="blocks.2.attn.hook_z", model_name="tiny")
    if arch == "standard":
        cfg = StandardSAEConfig(d_in=d_in, d_sae=40, reshape_activations="hook_z", metadata=meta)
    else:
        cfg = TopKSAEConfig(d_in=d_in, d_sae=40, k=7, reshape_activations="hook_z", metadata=meta,
                            rescale_acts_by_decoder_norm=True)
    theirs = SAE.from_dict(cfg.to_dict())
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
    theirs.save_model(tmp_path / "t")
    ours = load_sae(tmp_path / "t", model)
    assert ours.cfg.layer == 2 and ours.cfg.d_sae == 40
    z = torch.randn(6, model.n_heads, model.d_head)
    with torch.no_grad():
        ft = theirs.encode(z)
        fo = ours.encode(z.reshape(6, -1))
        assert torch.allclose(theirs.decode(ft).reshape(6, -1), ours.decode(fo), atol=1e-4)
        if arch == "standard":
            assert torch.allclose(ft, fo, atol=1e-5)


def test_refuses_other_model_layer_width_and_corrupt(tmp_path, model):
    sae = _trained(model, "standard")
    save_sae(sae, tmp_path / "s")
    with pytest.raises(HeadscopeError, match="not for"):
        load_sae(tmp_path / "s", tiny_model("qwen2", seed=1))
    with pytest.raises(HeadscopeError, match="layer 1, not layer 2"):
        load_sae(tmp_path / "s", model, layer=2)
    narrow = AttnSAE(SAEConfig(d_in=16, d_sae=8, n_heads=4, d_head=4, layer=1))  # no model identity recorded
    save_sae(narrow, tmp_path / "n")
    with pytest.raises(HeadscopeError, match="d_in 16"):
        load_sae(tmp_path / "n", model)
    (tmp_path / "s/sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(HeadscopeError, match="corrupt"):
        load_sae(tmp_path / "s", model)
    (tmp_path / "s/cfg.json").write_text("{not json")
    with pytest.raises(HeadscopeError, match="corrupt JSON"):
        load_sae(tmp_path / "s", model)
    with pytest.raises(HeadscopeError, match="does not exist"):
        load_sae(tmp_path / "nothing", model)
