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
from .models.arch import get_path

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
    ``mix`` (z-space kinds only): None replaces z by the edit; else z ← z + mix·(edit(z) − z), ``mix`` a float
    or a tensor broadcastable to the edited [B, S, U, Dh] slice. A per-row 0/1 ``mix`` ablates different heads
    in different rows of one batch; a zero ``mix`` that requires grad gives, by backpropagation,
    ∂metric/∂mix = (edit(z) − z)·∂metric/∂z — attribution patching of every edited head at once.
    """

    layer: int
    heads: Sequence[int] | None = None
    kind: str = "zero"
    value: float | torch.Tensor | None = None
    positions: int | Sequence[int] | slice | None = None
    mix: float | torch.Tensor | None = None


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


def _apply_edit(x: torch.Tensor, idx: list[int] | None, kind: str, value, positions, mix=None) -> torch.Tensor:
    """Edit x [B, S, U, ...] along unit axis 2 for units ``idx`` at ``positions``; returns a new tensor
    (``mix``: see :class:`HeadIntervention`)."""
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
    if mix is not None:
        new = view + (mix.to(x.device, x.dtype) if torch.is_tensor(mix) else float(mix)) * (new - view)
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


def validate(model: Model, input_ids: torch.Tensor, layers: Iterable[int] | None, what: set[str],
             interventions: Sequence[HeadIntervention | NeuronIntervention], stop_after: int | None) -> list[int]:
    """Check a capture request before any hook is registered; returns the sorted layers to read."""
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
    return layers


@dataclass(frozen=True)
class HookPoint:
    """Where a read-only capture name comes from: a submodule of the block (an :class:`ArchSpec` field, or
    the block itself when ``module`` returns None), read before (``pre``) or after it runs."""

    module: Callable[[object], str | None]
    pre: bool
    read: Callable[[Model, int, tuple, object], torch.Tensor]
    """``read(model, layer, args, output_or_kwargs)`` → the tensor to store."""


def _read_pattern(model: Model, layer: int, args, output) -> torch.Tensor:
    if not isinstance(output, (tuple, list)) or len(output) < 2 or output[1] is None:
        raise HeadscopeError(f"layer {layer}: attention module returned no weights under eager attention")
    return output[1]


HOOK_POINTS: dict[str, HookPoint] = {
    "pattern": HookPoint(lambda a: a.attn, False, _read_pattern),
    "v": HookPoint(lambda a: a.v_proj, False, lambda m, l, args, out: _values(m, out)),
    "mlp_pre": HookPoint(lambda a: a.mlp_gate if a.mlp_kind == "gated" else a.mlp_in, False,
                         lambda m, l, args, out: out),
    "mlp_up": HookPoint(lambda a: a.mlp_in, False, lambda m, l, args, out: out),
    "resid_pre": HookPoint(lambda a: None, True, lambda m, l, args, kw: args[0] if args else kw["hidden_states"]),
    "resid_post": HookPoint(lambda a: None, False, lambda m, l, args, out: _first(out)),
}
"""The read-only capture names. ``z``/``result``/``attn_out``/``mlp_post`` are read by the hooks that also
apply interventions (:class:`_Hooks` ``z_edits``, ``attn_out``, ``neurons``); ``logits``/``logprobs`` come
from the model's output."""


class _Hooks:
    """Registers the hooks of one capture and records which fired (every one must)."""

    def __init__(self, model: Model, out: Captured, reduce: dict, store_device, grad: bool):
        self.model, self.out, self.reduce, self.store_device, self.grad = model, out, reduce, store_device, grad
        self.fired: dict[str, bool] = {}
        self.handles: list = []

    def store(self, name: str, layer: int, t: torch.Tensor) -> None:
        t = t if self.grad else t.detach()
        if name in self.reduce:
            t = self.reduce[name](layer, t)
        if self.store_device is not None:
            t = t.to(self.store_device)
        self.out.tensors[name][layer] = t

    def add(self, module, key: str, fn, pre: bool = False, with_kwargs: bool = False) -> None:
        self.fired[key] = False

        def wrapped(mod, *args):
            self.fired[key] = True
            return fn(*args)

        if pre:
            self.handles.append(module.register_forward_pre_hook(wrapped, with_kwargs=with_kwargs))
        else:
            self.handles.append(module.register_forward_hook(wrapped))

    def read_only(self, layer: int, name: str) -> None:
        point = HOOK_POINTS[name]
        sub = point.module(self.model.arch)
        module = self.model.block(layer) if sub is None else self.model.block_module(layer, sub)
        if point.pre:
            self.add(module, f"{name}{layer}", lambda args, kw: self.store(
                name, layer, point.read(self.model, layer, args, kw)), pre=True, with_kwargs=True)
        else:
            self.add(module, f"{name}{layer}", lambda args, output: self.store(
                name, layer, point.read(self.model, layer, args, output)))

    def z_edits(self, layer: int, edits: list, want: set[str]) -> None:
        """z (and head results) at the input of the output projection, after the head interventions."""
        model = self.model
        H, Dh = model.n_heads, model.d_head

        def z_hook(args):
            z = args[0]
            zh = z.reshape(*z.shape[:-1], H, Dh)
            for iv in edits:
                zh = _apply_edit(zh, iv.heads, iv.kind, iv.value, iv.positions, iv.mix)
            if "z" in want:
                self.store("z", layer, zh)
            if "result" in want:
                self.store("result", layer, torch.einsum("bshk,hkd->bshd", zh, model.W_O(layer).to(zh.device)))
            return (zh.reshape(z.shape),) + tuple(args[1:]) if edits else None
        self.add(model.block_module(layer, model.arch.o_proj), f"z{layer}", z_hook, pre=True)

    def attn_out(self, layer: int, adds: list, want: set[str]) -> None:
        """The output projection's output, after the residual-space ``add`` interventions."""
        def o_hook(args, output):
            y = output
            for iv in adds:  # value added once per listed head (once if heads is None)
                v = torch.as_tensor(iv.value, device=y.device, dtype=y.dtype)
                y = y.clone()
                y[:, _pos_index(iv.positions)] += (len(iv.heads) if iv.heads else 1) * v
            if "attn_out" in want:
                self.store("attn_out", layer, y)
            return y if adds else None
        self.add(self.model.block_module(layer, self.model.arch.o_proj), f"o{layer}", o_hook)

    def neurons(self, layer: int, edits: list, want: set[str]) -> None:
        """Neuron activations at the input of W_out, after the neuron interventions."""
        def n_hook(args):
            x = args[0].unsqueeze(-1)
            for iv in edits:
                val = iv.value
                if iv.kind in ("mean", "patch", "add") and val is not None:
                    val = torch.as_tensor(val).unsqueeze(-1)
                x = _apply_edit(x, iv.neurons, iv.kind, val, iv.positions)
            act = x.squeeze(-1)
            if "mlp_post" in want:
                self.store("mlp_post", layer, act)
            return (act,) + tuple(args[1:]) if edits else None
        self.add(self.model.block_module(layer, self.model.arch.mlp_out), f"post{layer}", n_hook, pre=True)

    def stop_after(self, layer: int, keep_resid: bool) -> None:
        def stop(args, output):
            if keep_resid:
                self.store("resid_post", layer, _first(output))
            raise _Stop()
        self.add(self.model.block(layer), f"stop{layer}", stop)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def check_fired(self) -> None:
        missing = [k for k, v in self.fired.items() if not v]
        if missing:
            raise HeadscopeError(f"hooks never fired: {missing} ({self.model.arch.family} adapter does not match "
                                 f"the model)")


def check_resume(model: Model, input_ids: torch.Tensor, resume, layers: list[int],
                 interventions: Sequence[HeadIntervention | NeuronIntervention], stop_after: int | None) -> None:
    """Refuse a ``resume=(L, h)`` that cannot stand for the skipped blocks' output."""
    L, h = resume
    model.check_layer(L)
    want = (input_ids.shape[0], input_ids.shape[1], model.d_model)
    if not isinstance(h, torch.Tensor) or tuple(h.shape) != want:
        raise HeadscopeError(f"resume: the residual stream must be [batch, seq, d_model] = {list(want)}, got "
                             f"{list(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__}")
    below = [l for l in layers if l < L] + [iv.layer for iv in interventions if iv.layer < L]
    if below or (stop_after is not None and stop_after < L):
        raise HeadscopeError(f"resume at layer {L}: layer {min(below + ([stop_after] if stop_after is not None else []))} "
                             "is below it, and blocks below the resume layer are not run")


def _block_returns_tuple(model: Model) -> bool:
    """Whether the model's blocks return a tuple (hidden, …) or the hidden tensor itself (it varies across
    transformers versions and families): seen once per model, on a one-token pass stopped after block 0."""
    if not hasattr(model.hf, "_headscope_block_tuple"):
        seen: dict[str, bool] = {}

        def look(mod, args, output):
            seen["tuple"] = isinstance(output, (tuple, list))
            raise _Stop()
        handle = model.block(0).register_forward_hook(look)
        try:
            with torch.no_grad():
                model.hf(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model.device), use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "tuple" not in seen:
            raise HeadscopeError(f"{model.arch.family} adapter: block 0 never ran on a one-token pass")
        model.hf._headscope_block_tuple = seen["tuple"]
    return model.hf._headscope_block_tuple


@contextmanager
def skipped_blocks(model: Model, resume: tuple[int, torch.Tensor] | None):
    """Within the context, blocks 0..L−1 return ``h`` without running (``resume=(L, h)``): block L reads
    ``h`` as its input, and the embedding — the only work left below L — is a table look-up. Every HF
    decoder passes each block's output to the next, whatever else it passes (masks, rotary tables), so
    replacing the blocks' ``forward`` works across families; the originals are restored on exit."""
    if resume is None or resume[0] == 0:
        yield
        return
    L, h = resume
    out = (h.to(model.device, model.dtype),) if _block_returns_tuple(model) else h.to(model.device, model.dtype)
    blocks = [model.block(i) for i in range(L)]
    saved = [b.__dict__.get("forward") for b in blocks]
    try:
        for b in blocks:
            b.forward = lambda *args, **kwargs: out
        yield
    finally:
        for b, f in zip(blocks, saved):
            if f is None:
                del b.forward
            else:
                b.forward = f


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
    logit_positions: torch.Tensor | None = None,
    resume: tuple[int, torch.Tensor] | None = None,
) -> Captured:
    """One forward pass over ``input_ids`` [B, S], returning the tensors named in ``what``.

    ``layers``: layers to capture per-layer tensors from (default all). ``reduce[name](layer, t)``
    is applied inside the hook before storing, so e.g. ``{"result": lambda l, r: r[:, -1]}`` keeps
    only the last position and memory stays bounded. ``store_device``: where captured tensors are
    gathered (default: where they are produced). ``stop_after``: stop the forward pass after that
    block (no logits then). ``grad``: keep the autograd graph (default: no_grad).
    ``logit_positions``: [B] one position per row; ``logits``/``logprobs`` are then [B, 1, V], the
    unembedding run on that position of each row only (not on all S).
    ``resume=(L, h)``: start the pass at block L, ``h`` [B, S, d] the residual stream entering it
    (``resid_pre`` of layer L from an earlier pass over the same ``input_ids`` with no edit below L):
    blocks 0..L−1 are not run (:func:`skipped_blocks`), so a pass that edits layer L costs the layers
    from L on. Nothing may be read or edited below L.
    """
    what = set(what)
    layers = validate(model, input_ids, layers, what, interventions, stop_after)
    if resume is not None:
        check_resume(model, input_ids, resume, layers, interventions, stop_after)
    out = Captured(tensors={name: {} for name in what if name in PER_LAYER})
    hooks = _Hooks(model, out, reduce or {}, store_device, grad)
    head_ivs: dict[int, list] = {}
    neuron_ivs: dict[int, list] = {}
    for iv in interventions:
        (head_ivs if isinstance(iv, HeadIntervention) else neuron_ivs).setdefault(iv.layer, []).append(iv)
    hook_layers = sorted(set(layers) | set(head_ivs) | set(neuron_ivs))
    if stop_after is not None:
        hook_layers = [l for l in hook_layers if l <= stop_after]
    for layer in hook_layers:
        want = what if layer in layers else set()
        z_edits = [iv for iv in head_ivs.get(layer, []) if iv.kind != "add"]
        r_adds = [iv for iv in head_ivs.get(layer, []) if iv.kind == "add"]
        if z_edits or want & {"z", "result"}:
            hooks.z_edits(layer, z_edits, want)
        if r_adds or "attn_out" in want:
            hooks.attn_out(layer, r_adds, want)
        if neuron_ivs.get(layer) or "mlp_post" in want:
            hooks.neurons(layer, neuron_ivs.get(layer, []), want)
        for name in HOOK_POINTS:
            if name in want and not (name == "resid_post" and stop_after == layer):
                hooks.read_only(layer, name)
    if stop_after is not None:
        hooks.stop_after(stop_after, keep_resid=stop_after in layers and "resid_post" in what)
    if logit_positions is not None:
        if tuple(torch.as_tensor(logit_positions).shape) != (input_ids.shape[0],):
            raise HeadscopeError(f"logit_positions must be [batch] = [{input_ids.shape[0]}], got shape "
                                 f"{tuple(torch.as_tensor(logit_positions).shape)}")
        rows = torch.arange(input_ids.shape[0])
        pos = torch.as_tensor(logit_positions).long()
        hooks.add(get_path(model.hf, model.arch.unembed), "unembed",
                  lambda args: (args[0][rows.to(args[0].device), pos.to(args[0].device)][:, None],) + tuple(args[1:]),
                  pre=True)

    ids = input_ids.to(model.device) if str(model.device) != "meta" else input_ids
    ctx = torch.enable_grad() if grad else torch.no_grad()
    try:
        with ctx, eager_attention(model, "pattern" in what), skipped_blocks(model, resume):
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
        hooks.remove()
    hooks.check_fired()
    return out


def run_with_interventions(model: Model, input_ids: torch.Tensor,
                           interventions: Sequence[HeadIntervention | NeuronIntervention],
                           attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final logits [B, S, V] with the given interventions applied."""
    return capture(model, input_ids, attention_mask=attention_mask, layers=[], what=("logits",),
                   interventions=interventions).logits
