"""Hooks in, tensors out: the only module that touches PyTorch hooks.

``capture(model, ids, layers=[...], what={...})`` runs one forward pass and returns a :class:`Captured`
with the asked tensors per layer. Names and shapes (B batch, S positions, H query heads, H_kv value
heads, Dh head dim, d model dim, M MLP neurons, V vocabulary):

=============  ===================  ==========================================================
name           shape                what it is
=============  ===================  ==========================================================
``z``          [B, S, H, Dh]        input of the attention output projection, split by head
``result``     [B, S, H, d]         per-head result r_h = z_h · W_O[h] (no b_O: it belongs to no head)
``v``          [B, S, H_kv, Dh]     value vectors (GQA: query head h reads group h // (H/H_kv))
``pattern``    [B, H, S, S]         attention probabilities, [dest, src]
``attn_out``   [B, S, d]            output of the attention projection (Σ_h r_h + b_O)
``mlp_pre``    [B, S, M]            standard MLP: x·W_in (+b); gated MLP: the gate x·W_gate
``mlp_up``     [B, S, M]            gated MLP only: the up branch x·W_up
``mlp_post``   [B, S, M]            neuron activations: the input of W_out
``resid_pre``  [B, S, d]            residual stream entering the block
``resid_post`` [B, S, d]            residual stream leaving the block
``logits``     [B, S, V]            final logits (not per layer)
``logprobs``   [B, S, V]            log-softmax of the final logits in float32 (not per layer)
=============  ===================  ==========================================================

Patterns need attention weights, which sdpa/flash kernels never form: when ``pattern`` is asked,
the model runs that pass with eager attention and switches back afterwards.

Interventions (:class:`HeadIntervention`, :class:`NeuronIntervention`) edit z or the neuron
activations inside the same hooks. Every hook must fire; one that does not is an error, never a
silently missing tensor.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from .errors import HeadscopeError
from .models.load import Model

PER_LAYER = ("z", "result", "v", "pattern", "attn_out", "mlp_pre", "mlp_up", "mlp_post", "resid_pre", "resid_post")
GLOBAL = ("logits", "logprobs")
KINDS = ("zero", "mean", "scale", "patch", "add")


@dataclass
class HeadIntervention:
    """Edit heads of one layer during the forward pass.

    kind:
      * ``zero``: z_h ← 0 (same as zeroing the head's values at every position).
      * ``mean``: z_h ← value[h], value a mean z of shape [H, Dh] (or [S, H, Dh]).
      * ``scale``: z_h ← value · z_h (value a float, or a tensor broadcastable to the edited
        [B, S, U, Dh] slice, e.g. a per-row head mask [B, 1, H, 1] with ``heads=None``).
      * ``patch``: z_h ← value[..., h, :], value z from another run, [B, S, H, Dh].
      * ``add``: r_h ← r_h + value, value a residual-space vector [d], for each listed head (added to the
        projection output, before any post-attention norm).
    ``positions``: None for every position, else an int, list of ints or slice of positions.
    """

    layer: int
    heads: Sequence[int] | None = None
    kind: str = "zero"
    value: float | torch.Tensor | None = None
    positions: int | Sequence[int] | slice | None = None


@dataclass
class NeuronIntervention:
    """Edit MLP neuron activations (the input of W_out) of one layer.

    kind: ``zero``, ``mean`` (value [M] or [S, M]), ``scale`` (float), ``patch`` (value [B, S, M]),
    ``add`` (value a float or [len(neurons)] added to the activations).
    """

    layer: int
    neurons: Sequence[int] | None = None
    kind: str = "zero"
    value: float | torch.Tensor | None = None
    positions: int | Sequence[int] | slice | None = None


@dataclass
class Captured:
    """Tensors from one forward pass: ``tensors[name][layer]`` for per-layer names, and the final
    ``logits`` / ``logprobs`` (None unless asked). ``stopped_at`` is set when the pass stopped early."""

    tensors: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    stopped_at: int | None = None

    def __getitem__(self, name: str) -> dict[int, torch.Tensor]:
        return self.tensors[name]


class _Stop(Exception):
    pass


def _pos_index(positions):
    if positions is None:
        return slice(None)
    if isinstance(positions, int):
        return [positions]
    return positions


def _apply_edit(x: torch.Tensor, idx: list[int] | None, kind: str, value, positions) -> torch.Tensor:
    """Edit x [B, S, U, ...] along unit axis 2 for units ``idx`` at ``positions``; returns a new tensor."""
    if kind not in KINDS:
        raise HeadscopeError(f"unknown intervention kind '{kind}' (choose from {', '.join(KINDS)})")
    x = x.clone()
    units = slice(None) if idx is None else list(idx)
    pos = _pos_index(positions)
    view = x[:, pos][:, :, units]
    if kind == "zero":
        new = torch.zeros_like(view)
    elif kind == "scale":
        new = view * (value.to(x.device, x.dtype) if torch.is_tensor(value) else float(value))
    elif kind == "mean":
        v = torch.as_tensor(value, device=x.device, dtype=x.dtype)
        if v.dim() == x.dim() - 1:  # [S, U, ...]
            v = v[pos]
            new = v[:, units].unsqueeze(0).expand_as(view)
        else:  # [U, ...]
            new = v[units].expand_as(view)
    elif kind == "patch":
        v = torch.as_tensor(value, device=x.device, dtype=x.dtype).reshape(x.shape)
        new = v[:, pos][:, :, units]
    else:  # add
        v = torch.as_tensor(value, device=x.device, dtype=x.dtype)
        new = view + v
    x[:, pos] = _assign_units(x[:, pos], units, new)
    return x


def _assign_units(block: torch.Tensor, units, new: torch.Tensor) -> torch.Tensor:
    block = block.clone()
    block[:, :, units] = new
    return block


@contextmanager
def eager_attention(model: Model, enabled: bool = True):
    """Run the model with eager attention inside the block (so attention weights are formed)."""
    hf = model.hf
    current = getattr(hf.config, "_attn_implementation", "eager")
    if not enabled or current == "eager":
        yield
        return
    hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        hf.set_attn_implementation(current)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _values(model: Model, out: torch.Tensor) -> torch.Tensor:
    """Value vectors [B, S, H_kv, Dh] from the v-projection output."""
    B, S = out.shape[:2]
    H, Hkv, Dh = model.n_heads, model.n_kv_heads, model.d_head
    layout = model.arch.qkv
    if layout == "separate":
        return out.reshape(B, S, Hkv, Dh)
    if layout == "split3":
        return out[..., 2 * H * Dh:].reshape(B, S, H, Dh)
    if layout == "neox":
        return out.reshape(B, S, H, 3 * Dh)[..., 2 * Dh:]
    raise HeadscopeError(f"unknown qkv layout '{layout}'")


def capture(
    model: Model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    layers: Iterable[int] | None = None,
    what: Iterable[str] = ("z",),
    interventions: Sequence[HeadIntervention | NeuronIntervention] = (),
    reduce: dict[str, Callable[[int, torch.Tensor], torch.Tensor]] | None = None,
    store_device: str | torch.device | None = None,
    stop_after: int | None = None,
    grad: bool = False,
) -> Captured:
    """One forward pass over ``input_ids`` [B, S], returning the tensors named in ``what``.

    ``layers``: layers to capture per-layer tensors from (default all). ``reduce[name](layer, t)``
    is applied inside the hook before storing, so e.g. ``{"result": lambda l, r: r[:, -1]}`` keeps
    only the last position and memory stays bounded. ``store_device``: where captured tensors are
    gathered (default: where they are produced). ``stop_after``: stop the forward pass after that
    block (no logits then). ``grad``: keep the autograd graph (default: no_grad).
    """
    what = set(what)
    unknown = what - set(PER_LAYER) - set(GLOBAL)
    if unknown:
        raise HeadscopeError(f"unknown capture name(s) {sorted(unknown)}; choose from {PER_LAYER + GLOBAL}")
    if input_ids.dim() != 2:
        raise HeadscopeError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise HeadscopeError("empty input: no tokens to run")
    model.check_length(input_ids.shape[1])
    layers = sorted(set(range(model.n_layers) if layers is None else layers))
    for layer in layers:
        model.check_layer(layer)
    for iv in interventions:
        model.check_layer(iv.layer)
        if isinstance(iv, HeadIntervention):
            for h in iv.heads or []:
                model.check_head(h)
        elif iv.neurons is not None:
            bad = [n for n in iv.neurons if not 0 <= n < model.d_mlp]
            if bad:
                raise HeadscopeError(f"neuron {bad[0]} is out of range: layer {iv.layer} has neurons 0..{model.d_mlp - 1}")
    if stop_after is not None:
        model.check_layer(stop_after)
        if what & set(GLOBAL):
            raise HeadscopeError("logits/logprobs need the full forward pass; drop stop_after")
    if model.arch.mlp_kind != "gated" and "mlp_up" in what:
        raise HeadscopeError(f"'mlp_up' exists only for gated MLPs; {model.name} has a standard MLP")
    reduce = reduce or {}
    out = Captured(tensors={name: {} for name in what if name in PER_LAYER})
    fired: dict[str, bool] = {}
    handles = []
    a = model.arch
    H, Dh = model.n_heads, model.d_head

    def store(name: str, layer: int, t: torch.Tensor):
        t = t if grad else t.detach()
        if name in reduce:
            t = reduce[name](layer, t)
        if store_device is not None:
            t = t.to(store_device)
        out.tensors[name][layer] = t

    def hook(module, key, fn, pre=False, with_kwargs=False):
        fired[key] = False

        def wrapped(mod, *args):
            fired[key] = True
            return fn(*args)

        if pre:
            handles.append(module.register_forward_pre_hook(wrapped, with_kwargs=with_kwargs))
        else:
            handles.append(module.register_forward_hook(wrapped))

    head_ivs = {}
    neuron_ivs = {}
    for iv in interventions:
        (head_ivs if isinstance(iv, HeadIntervention) else neuron_ivs).setdefault(iv.layer, []).append(iv)

    hook_layers = sorted(set(layers) | set(head_ivs) | set(neuron_ivs))
    if stop_after is not None:
        hook_layers = [l for l in hook_layers if l <= stop_after]

    for layer in hook_layers:
        block = model.block(layer)
        want = layer in layers
        o_proj = model.block_module(layer, a.o_proj)
        z_edits = [iv for iv in head_ivs.get(layer, []) if iv.kind != "add"]
        r_adds = [iv for iv in head_ivs.get(layer, []) if iv.kind == "add"]
        if z_edits or (want and what & {"z", "result"}):
            def z_hook(args, layer=layer, z_edits=z_edits, want=want):
                z = args[0]
                zh = z.reshape(*z.shape[:-1], H, Dh)
                for iv in z_edits:
                    zh = _apply_edit(zh, iv.heads, iv.kind, iv.value, iv.positions)
                if want and "z" in what:
                    store("z", layer, zh)
                if want and "result" in what:
                    W_O = model.W_O(layer).to(zh.device)
                    store("result", layer, torch.einsum("bshk,hkd->bshd", zh, W_O))
                if z_edits:
                    return (zh.reshape(z.shape),) + tuple(args[1:])
                return None
            hook(o_proj, f"z{layer}", z_hook, pre=True)
        if r_adds or (want and "attn_out" in what):
            def o_hook(args, output, layer=layer, r_adds=r_adds, want=want):
                y = output
                for iv in r_adds:  # value added once per listed head (once if heads is None)
                    v = torch.as_tensor(iv.value, device=y.device, dtype=y.dtype)
                    y = y.clone()
                    y[:, _pos_index(iv.positions)] += (len(iv.heads) if iv.heads else 1) * v
                if want and "attn_out" in what:
                    store("attn_out", layer, y)
                return y if r_adds else None
            hook(o_proj, f"o{layer}", o_hook)
        if want and "pattern" in what:
            def p_hook(args, output, layer=layer):
                if not isinstance(output, (tuple, list)) or len(output) < 2 or output[1] is None:
                    raise HeadscopeError(f"layer {layer}: attention module returned no weights under eager attention")
                store("pattern", layer, output[1])
            hook(model.block_module(layer, a.attn), f"p{layer}", p_hook)
        if want and "v" in what:
            hook(model.block_module(layer, a.v_proj), f"v{layer}",
                 lambda args, output, layer=layer: store("v", layer, _values(model, output)))
        if want and "mlp_pre" in what:
            pre_mod = a.mlp_gate if a.mlp_kind == "gated" else a.mlp_in
            hook(model.block_module(layer, pre_mod), f"pre{layer}",
                 lambda args, output, layer=layer: store("mlp_pre", layer, output))
        if want and "mlp_up" in what:
            hook(model.block_module(layer, a.mlp_in), f"up{layer}",
                 lambda args, output, layer=layer: store("mlp_up", layer, output))
        n_edits = neuron_ivs.get(layer, [])
        if n_edits or (want and "mlp_post" in what):
            def n_hook(args, layer=layer, n_edits=n_edits, want=want):
                act = args[0]
                x = act.unsqueeze(-1)
                for iv in n_edits:
                    val = iv.value
                    if iv.kind in ("mean", "patch", "add") and val is not None:
                        val = torch.as_tensor(val).unsqueeze(-1)
                    x = _apply_edit(x, iv.neurons, iv.kind, val, iv.positions)
                act2 = x.squeeze(-1)
                if want and "mlp_post" in what:
                    store("mlp_post", layer, act2)
                return (act2,) + tuple(args[1:]) if n_edits else None
            hook(model.block_module(layer, a.mlp_out), f"post{layer}", n_hook, pre=True)
        if want and "resid_pre" in what:
            def rp_hook(args, kwargs, layer=layer):
                hs = args[0] if args else kwargs["hidden_states"]
                store("resid_pre", layer, hs)
            hook(block, f"rp{layer}", rp_hook, pre=True, with_kwargs=True)
        if (want and "resid_post" in what) or stop_after == layer:
            def rq_hook(args, output, layer=layer):
                if want and "resid_post" in what:
                    store("resid_post", layer, _first(output))
                if stop_after == layer:
                    raise _Stop()
            hook(block, f"rq{layer}", rq_hook)
    if stop_after is not None and stop_after not in hook_layers:
        def stop_hook(args, output):
            raise _Stop()
        hook(model.block(stop_after), f"stop{stop_after}", stop_hook)

    ids = input_ids.to(model.device) if str(model.device) != "meta" else input_ids
    ctx = torch.enable_grad() if grad else torch.no_grad()
    try:
        with ctx, eager_attention(model, "pattern" in what):
            try:
                res = model.hf(input_ids=ids, attention_mask=attention_mask, use_cache=False)
                logits = res.logits
                if "logits" in what:
                    out.logits = logits if store_device is None else logits.to(store_device)
                if "logprobs" in what:
                    lp = torch.log_softmax(logits.float(), dim=-1)
                    out.logprobs = lp if store_device is None else lp.to(store_device)
            except _Stop:
                out.stopped_at = stop_after
    finally:
        for h in handles:
            h.remove()
    missing = [k for k, v in fired.items() if not v]
    if missing:
        raise HeadscopeError(f"hooks never fired: {missing} ({model.arch.family} adapter does not match the model)")
    return out


def run_with_interventions(model: Model, input_ids: torch.Tensor,
                           interventions: Sequence[HeadIntervention | NeuronIntervention],
                           attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final logits [B, S, V] with the given interventions applied."""
    return capture(model, input_ids, attention_mask=attention_mask, layers=[], what=("logits",),
                   interventions=interventions).logits
