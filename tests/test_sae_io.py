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


ALL = ["standard", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk"]


def _trained(model, arch, seed=0):
    cfg = SAEConfig(d_in=model.n_heads * model.d_head, d_sae=48, n_heads=model.n_heads, d_head=model.d_head,
                    layer=1, architecture=arch, k=6, model=model.identity(), matryoshka_widths=[6, 24])
    sae = AttnSAE(cfg, seed=seed)
    with torch.no_grad():  # non-trivial biases and thresholds so that their handling is tested
        sae.b_dec.normal_(0, 0.5)
        sae.b_enc.normal_(0, 0.1)
        if hasattr(sae, "threshold"):
            sae.threshold.uniform_(0.0, 0.6)
    return sae


@pytest.mark.parametrize("arch", ALL)
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
    assert (f_ours > 0).any() and (f_ours == 0).any()              # neither all-on nor all-off
    assert torch.allclose(f_theirs, f_ours, atol=1e-5)
    assert torch.allclose(rec_theirs.reshape(2, 5, -1), sae.decode(f_ours).detach(), atol=1e-5)
    back = load_sae(tmp_path / "s", model, layer=1)
    assert torch.equal(back.W_enc, sae.W_enc) and back.cfg.architecture == arch
    assert arch in ("standard", "jumprelu") or back.cfg.k == sae.cfg.k
    assert back.cfg.matryoshka_widths == sae.cfg.matryoshka_widths
    assert torch.equal(back.encode(z), sae.encode(z))


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


# -- folders written by SAELens itself, every architecture --------------------------------------------

def _randomise(sae, scale=0.3):
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if "threshold" in name:
                p.uniform_(0.0, 0.5)
            else:
                p.normal_(0, scale)


def _saelens_inference(arch, d_in, d_sae, meta, **kw):
    from sae_lens import SAE
    from sae_lens.saes.gated_sae import GatedSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig
    from sae_lens import StandardSAEConfig, TopKSAEConfig
    cls = {"standard": StandardSAEConfig, "gated": GatedSAEConfig, "jumprelu": JumpReLUSAEConfig,
           "topk": TopKSAEConfig}[arch]
    sae = SAE.from_dict(cls(d_in=d_in, d_sae=d_sae, metadata=meta, **kw).to_dict())
    _randomise(sae)
    return sae


@pytest.mark.parametrize("arch,kw", [
    ("standard", {}), ("gated", {}), ("jumprelu", {}),
    ("jumprelu", {"apply_b_dec_to_input": False}),                 # Gemma Scope's convention
    ("topk", {"k": 5}), ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
    ("standard", {"reshape_activations": "none"}),                 # flattened H·Dh input
])
def test_saelens_written_whole_layer_encodings_equal(tmp_path, model, arch, kw):
    from sae_lens import SAE
    from sae_lens.saes.sae import SAEMetadata
    d_in = model.n_heads * model.d_head
    kw = {"reshape_activations": "hook_z", **kw}
    theirs = _saelens_inference(arch, d_in, 40, SAEMetadata(hook_name="blocks.2.attn.hook_z", model_name="tiny"), **kw)
    theirs.save_model(tmp_path / "t")
    theirs = SAE.load_from_disk(str(tmp_path / "t"))                # what SAELens itself reads back
    ours = load_sae(tmp_path / "t", model)
    assert ours.cfg.layer == 2 and ours.cfg.d_sae == 40 and ours.cfg.architecture == arch
    z = torch.randn(64, model.n_heads, model.d_head)
    with torch.no_grad():
        x = z if kw["reshape_activations"] == "hook_z" else z.reshape(64, -1)
        ft, fo = theirs.encode(x), ours.encode(z.reshape(64, -1))
        assert (fo > 0).any() and (fo == 0).any()
        assert torch.allclose(ft, fo, atol=1e-4), (ft - fo).abs().max()
        assert torch.allclose(theirs.decode(ft).reshape(64, -1), ours.decode(fo), atol=1e-4)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_saelens_trained_batchtopk_both_forms(tmp_path, model, arch):
    """SAELens saves BatchTopK / Matryoshka SAEs in training form (global topk_threshold, decoder-norm
    rescaling) or inference form (JumpReLU): both load and encode as SAELens' inference SAE does."""
    from sae_lens import SAE
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)
    from sae_lens.saes.sae import SAEMetadata
    d_in = model.n_heads * model.d_head
    meta = SAEMetadata(hook_name="blocks.1.attn.hook_z", model_name="tiny")
    if arch == "batchtopk":
        theirs = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=40, k=4, metadata=meta,
                                                                 reshape_activations="hook_z"))
    else:
        theirs = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=d_in, d_sae=40, k=4, matryoshka_widths=[10, 40], metadata=meta, reshape_activations="hook_z"))
    _randomise(theirs)
    with torch.no_grad():
        theirs.W_dec.mul_(torch.rand(40, 1) + 0.5)                  # non-unit decoder rows: rescaling matters
        theirs.topk_threshold.fill_(0.4)
    theirs.save_model(tmp_path / "train")
    theirs.save_inference_model(tmp_path / "inf")
    ref = SAE.load_from_disk(str(tmp_path / "inf"))
    z = torch.randn(64, model.n_heads, model.d_head)
    with torch.no_grad():
        want = ref.encode(z)
        assert (want > 0).any() and (want == 0).any()
        for folder in ("train", "inf"):
            ours = load_sae(tmp_path / folder, model)
            got = ours.encode(z.reshape(64, -1))
            assert torch.allclose(got, want, atol=1e-4), (folder, (got - want).abs().max())
            assert torch.allclose(ours.decode(got), ref.decode(want).reshape(64, -1), atol=1e-4)
        assert load_sae(tmp_path / "train", model).cfg.architecture == arch
        if arch == "matryoshka_batchtopk":
            assert load_sae(tmp_path / "train", model).cfg.matryoshka_widths == [10, 40]


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated"])
def test_saelens_per_head_sae(tmp_path, model, arch):
    """A hook_z SAE on one head (hook_head_index) reads that head only; splicing its reconstruction
    changes that head only; saving writes it back per head."""
    from sae_lens import SAE
    from sae_lens.saes.sae import SAEMetadata
    h = 1
    theirs = _saelens_inference(arch, model.d_head, 24, SAEMetadata(hook_name="blocks.0.attn.hook_z",
                                                                    hook_head_index=h, model_name="tiny"))
    theirs.save_model(tmp_path / "t")
    ours = load_sae(tmp_path / "t", model)
    assert ours.cfg.head_index == h and ours.cfg.d_in == model.n_heads * model.d_head
    z = torch.randn(64, model.n_heads, model.d_head)
    with torch.no_grad():
        ft, fo = theirs.encode(z[:, h]), ours.encode(z.reshape(64, -1))
        assert (fo > 0).any() and torch.allclose(ft, fo, atol=1e-4)
        rec = ours(z.reshape(64, -1)).recon.reshape(64, model.n_heads, model.d_head)
        assert torch.allclose(rec[:, h], theirs.decode(ft), atol=1e-4)
        others = [i for i in range(model.n_heads) if i != h]
        assert torch.equal(rec[:, others], z[:, others])
        share = ours.head_blocks("dec").norm(dim=-1)                # decoder lives in head h only
        assert share[:, others].abs().max() == 0
    save_sae(ours, tmp_path / "back")
    again = SAE.load_from_disk(str(tmp_path / "back"))
    with torch.no_grad():
        assert torch.allclose(again.encode(z[:, h]), ft, atol=1e-5)


def test_unmappable_saelens_folders_refused(tmp_path, model):
    from sae_lens.saes.sae import SAEMetadata
    d_in = model.n_heads * model.d_head
    d_model = model.cfg.d_model if hasattr(model, "cfg") else d_in
    out = _saelens_inference("standard", d_model, 16, SAEMetadata(hook_name="blocks.0.hook_attn_out"))
    out.save_model(tmp_path / "attn_out")
    with pytest.raises(HeadscopeError, match="hook_attn_out.*not attention z"):
        load_sae(tmp_path / "attn_out", model)
    ln = _saelens_inference("standard", d_in, 16, SAEMetadata(hook_name="blocks.0.attn.hook_z"),
                            normalize_activations="layer_norm", reshape_activations="hook_z")
    ln.save_model(tmp_path / "ln")
    with pytest.raises(HeadscopeError, match="layer_norm"):
        load_sae(tmp_path / "ln", model)
    jr = _saelens_inference("jumprelu", d_in, 16, SAEMetadata(hook_name="blocks.0.attn.hook_z"),
                            reshape_activations="hook_z")
    jr.save_model(tmp_path / "jr")
    from safetensors.torch import load_file, save_file
    w = load_file(str(tmp_path / "jr/sae_weights.safetensors"))
    del w["threshold"]
    save_file(w, str(tmp_path / "jr/sae_weights.safetensors"))
    with pytest.raises(HeadscopeError, match="lacks threshold"):
        load_sae(tmp_path / "jr", model)


def test_import_gemma_scope_npz_and_saelens_folder(tmp_path, model):
    """A Gemma Scope params.npz (JumpReLU, x·W_enc + b_enc) and a SAELens folder import into a run
    directory; the imported SAE encodes as SAELens does; the CLI stage writes it under sae/<name>."""
    import numpy as np
    from sae_lens import SAE
    from sae_lens.saes.sae import SAEMetadata
    from headscope.sae.io import import_sae
    d_in = model.n_heads * model.d_head
    ref = _saelens_inference("jumprelu", d_in, 32, SAEMetadata(hook_name="blocks.1.attn.hook_z"),
                             apply_b_dec_to_input=False, reshape_activations="hook_z")
    (tmp_path / "layer_1/width_16k").mkdir(parents=True)
    npz = tmp_path / "layer_1/width_16k/params.npz"
    np.savez(npz, **{k: getattr(ref, k).detach().numpy() for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")})
    ours = import_sae(npz, tmp_path / "run/sae/gs", model)
    z = torch.randn(50, model.n_heads, model.d_head)
    with torch.no_grad():
        want = ref.encode(z)
        assert (want > 0).any() and torch.allclose(ours.encode(z.reshape(50, -1)), want, atol=1e-4)
        back = load_sae(tmp_path / "run/sae/gs", model)
        assert back.cfg.layer == 1 and torch.allclose(back.encode(z.reshape(50, -1)), want, atol=1e-4)
        assert torch.allclose(SAE.load_from_disk(str(tmp_path / "run/sae/gs")).encode(z), want, atol=1e-4)
    with pytest.raises(HeadscopeError, match="give --layer"):
        np.savez(tmp_path / "params.npz", **{k: getattr(ref, k).detach().numpy() for k in ("W_enc", "W_dec")})
        import_sae(tmp_path / "params.npz", tmp_path / "run/sae/x", model)
    with pytest.raises(HeadscopeError, match="lacks b_enc"):
        import_sae(tmp_path / "params.npz", tmp_path / "run/sae/x", model, layer=1)
    assert not (tmp_path / "run/sae/x").exists()
    with pytest.raises(HeadscopeError, match="neither an SAE folder"):
        import_sae(tmp_path / "nothing", tmp_path / "run/sae/x", model)


def test_cli_import_refuses_wrong_layer(tmp_path, capsys):
    from sae_lens.saes.sae import SAEMetadata
    from headscope.cli import main
    m = tiny_model("qwen2")
    mdir = tmp_path / "tinymodel"
    m.hf.save_pretrained(mdir)
    m.tokenizer.save_pretrained(mdir)
    theirs = _saelens_inference("gated", m.n_heads * m.d_head, 24, SAEMetadata(hook_name="blocks.1.attn.hook_z"),
                                reshape_activations="hook_z")
    theirs.save_model(tmp_path / "pre")
    out = str(tmp_path / "run")
    assert main(["sae", "import", "--model", str(mdir), "--out", out, "--path", str(tmp_path / "pre"),
                 "--name", "G1"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"] == "gated"
    assert (tmp_path / "run/sae/G1/cfg.json").is_file()
    assert main(["sae", "import", "--model", str(mdir), "--out", out, "--path", str(tmp_path / "pre"),
                 "--name", "G2", "--layer", "0"]) == 2
    assert "trained on layer 1, not layer 0" in capsys.readouterr().err
