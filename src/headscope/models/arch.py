"""Architecture adapters: one small declarative table per model family.

An :class:`ArchSpec` says where things live inside a Hugging Face causal LM, so that the rest of
headscope never branches on the family. Paths are dotted attribute paths: ``layers`` from the
top-level model, everything else relative to one decoder block.

Conventions (see docs/design.md):

* ``o_proj`` is the attention output projection. Its *input* is z, shape [B, S, H·Dh], head-major.
  Its weight is read by module type (``Conv1D`` stores [in, out], ``nn.Linear`` stores [out, in]).
* ``ln_mlp`` is the norm in front of the MLP (Llama and GPT-NeoX call it ``post_attention_layernorm``
  although it sits *before* the MLP; Gemma-2/3 call it ``pre_feedforward_layernorm``).
* ``post_attn_norm`` is a norm applied to the attention output before it reaches the residual
  stream (Gemma-2/3). Where it is set, a head's result r_h is not what reaches the residual stream.
* ``parallel``: attention and MLP read the same residual stream (GPT-NeoX/Pythia with
  ``use_parallel_residual``); same-layer heads then do not feed that layer's MLP.
* ``qkv``: how to read the value vectors v (needed for direct feature attribution). ``"split3"``: a
  fused [q | k | v] projection (GPT-2 ``c_attn``); ``"neox"``: fused per head [q_h k_h v_h]
  (GPT-NeoX ``query_key_value``); ``"separate"``: a ``v_proj`` module of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import HeadscopeError


@dataclass(frozen=True)
class ArchSpec:
    """Where the parts of one model family live. Every field is a dotted path or a flag."""

    family: str
    """Human name of the family, e.g. ``"llama"``. Paths may list alternatives as ``a|b`` (renamed
    modules across transformers versions)."""
    model_types: tuple[str, ...]
    """HF ``config.model_type`` values this spec handles."""
    layers: str
    """Path of the ModuleList of decoder blocks, from the top-level model."""
    attn: str
    """Attention module, relative to a block."""
    o_proj: str
    """Attention output projection (its input is z), relative to a block."""
    v_proj: str
    """Module whose output holds the value vectors, relative to a block."""
    qkv: str
    """Layout of ``v_proj``'s output: ``"separate"``, ``"split3"`` or ``"neox"``."""
    mlp: str
    """MLP module, relative to a block."""
    mlp_kind: str
    """``"standard"`` (act(x·W_in)·W_out) or ``"gated"`` (act(x·W_gate) ⊙ (x·W_up))·W_out."""
    mlp_in: str
    """Standard: the input projection W_in. Gated: the up projection W_up."""
    mlp_gate: str | None
    """Gated only: the gate projection W_gate."""
    mlp_out: str
    """MLP output projection W_out (the down projection for gated MLPs); its input is the neuron activation."""
    mlp_act: str
    """Activation function module/callable of the MLP, relative to a block."""
    ln_attn: str
    """Norm in front of attention, relative to a block."""
    ln_mlp: str
    """Norm in front of the MLP, relative to a block."""
    final_norm: str
    """Final norm N(·), from the top-level model."""
    unembed: str
    """Unembedding module (``W_U`` = its weight, [V, d]), from the top-level model."""
    norm_kind: str
    """``"layernorm"`` (centres and scales) or ``"rmsnorm"`` (scales only)."""
    n_heads_attr: str
    n_kv_heads_attr: str | None
    d_model_attr: str
    n_layers_attr: str
    n_ctx_attr: str
    post_attn_norm: str | None = None
    """Norm after attention before the residual add (Gemma-2/3), else None."""
    parallel: Callable[[object], bool] = lambda cfg: False
    """Given the HF config, whether attention and MLP run in parallel."""
    rms_offset: float = 0.0
    """RMSNorm weight offset: Gemma multiplies by (1 + w), so its effective gain is w + 1."""


GPT2 = ArchSpec(
    family="gpt2", model_types=("gpt2",),
    layers="transformer.h", attn="attn", o_proj="attn.c_proj", v_proj="attn.c_attn", qkv="split3",
    mlp="mlp", mlp_kind="standard", mlp_in="mlp.c_fc", mlp_gate=None, mlp_out="mlp.c_proj", mlp_act="mlp.act",
    ln_attn="ln_1", ln_mlp="ln_2", final_norm="transformer.ln_f", unembed="lm_head", norm_kind="layernorm",
    n_heads_attr="n_head", n_kv_heads_attr=None, d_model_attr="n_embd", n_layers_attr="n_layer",
    n_ctx_attr="n_positions",
)

GPT_NEOX = ArchSpec(
    family="gpt_neox", model_types=("gpt_neox",),
    layers="gpt_neox.layers", attn="attention", o_proj="attention.dense", v_proj="attention.query_key_value",
    qkv="neox", mlp="mlp", mlp_kind="standard", mlp_in="mlp.dense_h_to_4h", mlp_gate=None,
    mlp_out="mlp.dense_4h_to_h", mlp_act="mlp.act", ln_attn="input_layernorm", ln_mlp="post_attention_layernorm",
    final_norm="gpt_neox.final_layer_norm", unembed="lm_head|embed_out", norm_kind="layernorm",
    n_heads_attr="num_attention_heads", n_kv_heads_attr=None, d_model_attr="hidden_size",
    n_layers_attr="num_hidden_layers", n_ctx_attr="max_position_embeddings",
    parallel=lambda cfg: bool(getattr(cfg, "use_parallel_residual", True)),
)

LLAMA = ArchSpec(
    family="llama", model_types=("llama", "mistral", "qwen2", "qwen3"),
    layers="model.layers", attn="self_attn", o_proj="self_attn.o_proj", v_proj="self_attn.v_proj",
    qkv="separate", mlp="mlp", mlp_kind="gated", mlp_in="mlp.up_proj", mlp_gate="mlp.gate_proj",
    mlp_out="mlp.down_proj", mlp_act="mlp.act_fn", ln_attn="input_layernorm", ln_mlp="post_attention_layernorm",
    final_norm="model.norm", unembed="lm_head", norm_kind="rmsnorm",
    n_heads_attr="num_attention_heads", n_kv_heads_attr="num_key_value_heads", d_model_attr="hidden_size",
    n_layers_attr="num_hidden_layers", n_ctx_attr="max_position_embeddings",
)

GEMMA2 = ArchSpec(
    family="gemma2", model_types=("gemma2", "gemma3_text"),
    layers="model.layers", attn="self_attn", o_proj="self_attn.o_proj", v_proj="self_attn.v_proj",
    qkv="separate", mlp="mlp", mlp_kind="gated", mlp_in="mlp.up_proj", mlp_gate="mlp.gate_proj",
    mlp_out="mlp.down_proj", mlp_act="mlp.act_fn", ln_attn="input_layernorm", ln_mlp="pre_feedforward_layernorm",
    final_norm="model.norm", unembed="lm_head", norm_kind="rmsnorm",
    n_heads_attr="num_attention_heads", n_kv_heads_attr="num_key_value_heads", d_model_attr="hidden_size",
    n_layers_attr="num_hidden_layers", n_ctx_attr="max_position_embeddings",
    post_attn_norm="post_attention_layernorm", rms_offset=1.0,
)

ARCHS: tuple[ArchSpec, ...] = (GPT2, GPT_NEOX, LLAMA, GEMMA2)


def arch_for(model_type: str) -> ArchSpec:
    """The spec for an HF ``model_type``; a clear error naming the supported ones otherwise."""
    for spec in ARCHS:
        if model_type in spec.model_types:
            return spec
    supported = ", ".join(t for s in ARCHS for t in s.model_types)
    raise HeadscopeError(
        f"unsupported architecture '{model_type}': headscope has no adapter saying where its attention "
        f"output projection, MLP and norms live (supported: {supported})"
    )


def get_path(root, path: str):
    """Resolve a dotted attribute path; ``a|b`` tries alternatives in order; ``None`` if missing."""
    if "|" in path:
        for alt in path.split("|"):
            obj = get_path(root, alt)
            if obj is not None:
                return obj
        return None
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
