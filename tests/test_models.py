"""Model loading, architecture adapters and TransformerLens parity."""

import json

import pytest
import torch

from headscope import HeadscopeError
from headscope.capture import capture
from headscope.models import ARCHS, arch_for, load_model
from headscope.testing import tiny_model


def test_every_family_resolves_its_modules(any_tiny):
    m = any_tiny
    assert m.W_O(0).shape == (m.n_heads, m.d_head, m.d_model)
    assert m.W_U.shape == (m.d_vocab, m.d_model)
    assert m.W_out(0).shape == (m.d_mlp, m.d_model)
    assert m.W_in(0).shape == (m.d_model, m.d_mlp)
    assert (m.W_gate(0) is not None) == (m.arch.mlp_kind == "gated")
    assert m.final_norm is not None


def test_adapter_flags():
    assert tiny_model("neox_parallel").parallel and not tiny_model("neox_sequential").parallel
    assert not tiny_model("gpt2").parallel
    g = tiny_model("gemma2")
    assert g.arch.post_attn_norm == "post_attention_layernorm" and g.arch.ln_mlp == "pre_feedforward_layernorm"
    q = tiny_model("llama_gqa")
    assert (q.n_heads, q.n_kv_heads) == (4, 2) and [q.kv_group(h) for h in range(4)] == [0, 0, 1, 1]


def test_unsupported_architecture_is_named():
    with pytest.raises(HeadscopeError, match="unsupported architecture 'mamba'"):
        arch_for("mamba")
    assert len({t for a in ARCHS for t in a.model_types}) >= 6


def test_transformer_lens_parity_on_tiny_gpt2():
    """hook_z and per-head results of TransformerLens equal headscope's z and result."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    m = tiny_model("gpt2")
    c = m.hf.config
    cfg = HookedTransformerConfig(d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_layers=c.n_layer, n_ctx=c.n_positions,
                                  n_heads=c.n_head, d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new",
                                  normalization_type="LN", use_attn_result=True, eps=c.layer_norm_epsilon,
                                  default_prepend_bos=False, device="cpu")
    tl = HookedTransformer(cfg)
    tl.load_state_dict(convert_gpt2_weights(m.hf, cfg), strict=False)
    tl.eval()
    ids = torch.randint(1, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, cache = tl.run_with_cache(ids)
    ours = capture(m, ids, what=("z", "result", "pattern", "logits"))
    torch.testing.assert_close(ours.logits, logits, atol=1e-4, rtol=1e-4)
    for layer in range(cfg.n_layers):
        torch.testing.assert_close(ours["z"][layer], cache[f"blocks.{layer}.attn.hook_z"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours["result"][layer], cache[f"blocks.{layer}.attn.hook_result"], atol=1e-5,
                                   rtol=1e-4)
        torch.testing.assert_close(ours["pattern"][layer], cache[f"blocks.{layer}.attn.hook_pattern"], atol=1e-6,
                                   rtol=1e-4)


def test_load_local_directory_equals_original(gpt2_dir):
    m = load_model(str(gpt2_dir))
    ref = tiny_model("gpt2")
    ids = torch.randint(1, 512, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(m.hf(ids).logits, ref.hf(ids).logits)
    assert m.identity()["unembed_sha1"] == ref.identity()["unembed_sha1"]
    ref.check_identity(m.identity())
    with pytest.raises(HeadscopeError, match="was made for model"):
        tiny_model("gpt2", seed=1).check_identity(m.identity(), "lens")
    bf = load_model(str(gpt2_dir), dtype="bfloat16")
    assert bf.dtype == torch.bfloat16


@pytest.mark.parametrize("spec,msg", [
    ("./no/such/model", "model path does not exist"),
    ("/tmp/definitely-not-here.gguf", "model path does not exist"),
])
def test_bad_model_specs(spec, msg):
    with pytest.raises(HeadscopeError, match=msg):
        load_model(spec)


def test_bad_dtype_and_corrupt_files(gpt2_dir, tmp_path):
    with pytest.raises(HeadscopeError, match="unknown dtype"):
        load_model(str(gpt2_dir), dtype="float13")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(HeadscopeError, match="cannot read GGUF file"):
        load_model(str(bad))
    d = tmp_path / "truncated"
    d.mkdir()
    for f in gpt2_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(HeadscopeError, match="cannot load model"):
        load_model(str(d))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HeadscopeError, match="no config.json"):
        load_model(str(empty))
    cfg = json.loads((gpt2_dir / "config.json").read_text())
    cfg["model_type"] = "mamba"
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HeadscopeError):
        load_model(str(odd))


def test_unknown_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HeadscopeError, match="cannot load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")


@pytest.mark.slow
def test_default_model_ioi(default_model):
    m = default_model
    assert (m.n_layers, m.n_heads, m.n_kv_heads, m.d_head) == (30, 9, 3, 64)
    ids = m.to_tokens("When Mary and John went to the store, John gave a drink to", prepend_bos=False)
    logits = capture(m, ids, what=("logits",), layers=[]).logits
    assert m.token_str([logits[0, -1].argmax()]) == [" Mary"]


@pytest.mark.slow
def test_default_model_second_load_uses_the_cache(default_model):
    from headscope.models.load import _gguf_cache, default_gguf_path
    assert (_gguf_cache(default_gguf_path()) / "model.safetensors").is_file()
    again = load_model("default")
    assert again.identity() == default_model.identity()


def test_device_map_auto_loads_and_captures(gpt2_dir):
    """device='auto' goes through accelerate's device_map (all on CPU here); capture still works."""
    m = load_model(str(gpt2_dir), device="auto")
    ids = torch.randint(1, 512, (1, 8))
    c = capture(m, ids, what=("result", "attn_out", "logits"), store_device="cpu")
    b = m.b_O(0)
    torch.testing.assert_close(c["result"][0].sum(2) + b, c["attn_out"][0], atol=1e-5, rtol=1e-4)
