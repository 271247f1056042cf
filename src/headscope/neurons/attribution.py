"""Step 3 (``attribute``): head → neuron attribution on every prompt, vectorised.

For neuron n of layer l and head h of layer k, on a prompt whose last position is i:

    A = ⟨ρ_{k,h}, w̃_n⟩ / σ          (σ applied when ``norm_scale=True``, the default)

* ρ_{k,h} is what head h puts into the residual stream at i: r_{k,h} = z_h · W_O[h] (no b_O), centred
  over d for LayerNorm models (LayerNorm subtracts the mean), and for architectures with a norm after
  attention (Gemma-2) linearised through it at its actual scale: γ_post ⊙ r / σ_post(attn_out), σ_post
  held fixed (like σ below; the exact Jacobian of a scale-invariant norm would make the same-layer
  heads' attributions sum to zero).
* w̃_n is the neuron's input direction with the pre-MLP norm's gain γ folded in:
  standard MLP w̃_n = γ ⊙ W_in[:, n]; gated MLP, first order at the actual gate value g and up value u
  of this prompt: w̃_n = γ ⊙ (act′(g)·u·W_gate[:, n] + act(g)·W_up[:, n]) (``gated="full"``), or only
  the gate term (``"gate"``) or only the up term (``"up"``).
* σ is the pre-MLP norm's actual scale at i (√(var + ε) for LayerNorm, √(mean x² + ε) for RMSNorm).
  With σ applied, A is the change in the neuron's pre-activation (standard) or activation (gated, to
  first order) when the head's direct contribution is removed and σ is held fixed. The reference code
  does not apply σ; σ is the same for all heads of a prompt (except through Gemma's post-attention
  norm), so it does not change which heads are active.

Eligible heads: every head of layers < l, plus layer l's heads where attention runs before the MLP
(sequential blocks), not where they run in parallel (GPT-NeoX/Pythia). **Active** on a prompt:
A > mean + 2·std over that prompt's eligible heads (population std). Heads active on 25–75 % of a
neuron's train prompts are the ones to explain.
"""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from ..capture import capture
from ..errors import HeadscopeError
from ..models.load import Model
from .mining import length_sorted_batches
from ..models.arch import get_path

GATED_MODES = ("full", "gate", "up")


def norm_eps(norm: torch.nn.Module) -> float:
    """The ε of a norm module, whatever the family calls it."""
    for name in ("eps", "variance_epsilon", "epsilon"):
        v = getattr(norm, name, None)
        if isinstance(v, (float, int)):
            return float(v)
    return 1e-5


def norm_scale(model: Model, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """σ of ``norm`` for inputs x [..., d] → [...]: √(var+ε) (LayerNorm) or √(mean x²+ε) (RMSNorm)."""
    x = x.float()
    eps = norm_eps(norm)
    if model.arch.norm_kind == "layernorm":
        return torch.sqrt(x.var(dim=-1, unbiased=False) + eps)
    return torch.sqrt((x * x).mean(dim=-1) + eps)


def eligible_layers(model: Model, layer: int) -> list[int]:
    """Layers whose heads can feed the MLP of ``layer``."""
    return list(range(layer + (0 if model.parallel else 1)))


def _act_and_grad(act, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        g = g.detach().float().clone().requires_grad_(True)
        y = act(g)
        (dy,) = torch.autograd.grad(y.sum(), g)
    return y.detach(), dy.detach()


def input_directions(model: Model, layer: int, neurons: torch.Tensor, g: torch.Tensor | None = None,
                     u: torch.Tensor | None = None, gated: str = "full") -> torch.Tensor:
    """w̃ for ``neurons`` [P] of ``layer`` → [P, d] float32. Gated MLPs need the gate and up values
    g, u [P] at the prompt's position; standard MLPs ignore them."""
    ln = model.block_module(layer, model.arch.ln_mlp)
    gamma = model.norm_gain(ln).detach().float()
    W_in = model.W_in(layer).detach().float()                      # [d, M]
    if model.arch.mlp_kind != "gated":
        return gamma[None, :] * W_in[:, neurons].T
    if gated not in GATED_MODES:
        raise HeadscopeError(f"unknown gated attribution mode '{gated}' (choose from {', '.join(GATED_MODES)})")
    W_gate = model.W_gate(layer).detach().float()
    a, da = _act_and_grad(model.mlp_act(layer), g)
    w = torch.zeros(len(neurons), model.d_model, device=W_in.device)
    if gated in ("full", "gate"):
        w = w + (da * u.float())[:, None] * W_gate[:, neurons].T
    if gated in ("full", "up"):
        w = w + a[:, None] * W_in[:, neurons].T
    return gamma[None, :] * w


def attribute_prompts(model: Model, rows: list[list[int]], layer_of: list[int], neuron_of: list[int],
                      gated: str = "full", apply_norm_scale: bool = True, batch_size: int = 32,
                      progress: bool = True, z_out: dict | None = None) -> torch.Tensor:
    """A for every prompt ``rows[i]`` (attribution to neuron ``neuron_of[i]`` of layer ``layer_of[i]``
    at the prompt's last token) and every head: [P, L·H] float32, head index k·H + h, NaN where the
    head is not eligible. ``z_out``: a dict that receives ``"z"`` [P, L·H, Dh] float16, every head's z at
    each prompt's last position (zero where not eligible), for the baselines of :mod:`.baselines`."""
    L, H, d = model.n_layers, model.n_heads, model.d_model
    A = torch.full((len(rows), L * H), float("nan"))
    Z = torch.zeros((len(rows), L * H, model.d_head), dtype=torch.float16) if z_out is not None else None
    a = model.arch
    gated_mlp = a.mlp_kind == "gated"
    bar = tqdm(total=len(rows), desc="attributing", unit=" prompt", disable=not progress, file=sys.stderr)
    for idx, ids in length_sorted_batches(rows, batch_size):
        last = torch.tensor([len(rows[i]) - 1 for i in idx])
        top = max(layer_of[i] for i in idx)
        what = {"result", "attn_out", "resid_pre", "mlp_pre"} | ({"mlp_up"} if gated_mlp else set()) | \
            ({"z"} if Z is not None else set())
        cap = capture(model, ids.to(model.device), layers=range(top + 1), what=what, stop_after=top,
                      reduce={k: (lambda l, t: t[torch.arange(t.shape[0], device=t.device), last.to(t.device)].float())
                              for k in what})
        for l in sorted({layer_of[i] for i in idx}):
            js = [j for j, i in enumerate(idx) if layer_of[i] == l]
            rows_l = [idx[j] for j in js]
            jt = torch.tensor(js, device=cap["resid_pre"][l].device)
            nrn = torch.tensor([neuron_of[i] for i in rows_l])
            g = cap["mlp_pre"][l][jt, nrn.to(jt.device)] if gated_mlp else None
            u = cap["mlp_up"][l][jt, nrn.to(jt.device)] if gated_mlp else None
            w = input_directions(model, l, nrn, g, u, gated).to(jt.device)              # [P, d]
            ks = eligible_layers(model, l)
            if not ks:
                continue
            R = torch.stack([_reaching(model, k, cap["result"][k][jt], cap["attn_out"][k][jt]) for k in ks], 1)
            vals = torch.einsum("pkhd,pd->pkh", R, w).reshape(len(js), -1)       # [P, |ks|·H]
            if apply_norm_scale:
                x = cap["resid_pre"][l][jt]
                if not model.parallel:
                    x = x + _attn_contribution(model, l, cap["attn_out"][l][jt])
                vals = vals / norm_scale(model, model.block_module(l, a.ln_mlp), x)[:, None]
            A[torch.tensor(rows_l), : len(ks) * H] = vals.cpu()
            if Z is not None:
                Z[torch.tensor(rows_l), : len(ks) * H] = torch.stack([cap["z"][k][jt] for k in ks], 1) \
                    .reshape(len(js), len(ks) * H, -1).to("cpu", torch.float16)
        bar.update(len(idx))
    bar.close()
    if Z is not None:
        z_out["z"] = Z
    return A


def _attn_contribution(model: Model, layer: int, attn_out: torch.Tensor) -> torch.Tensor:
    """What the attention output adds to the residual stream (through the post-attention norm if any)."""
    if model.arch.post_attn_norm:
        norm = model.block_module(layer, model.arch.post_attn_norm)
        return norm(attn_out.to(model.dtype)).float()
    return attn_out


def _reaching(model: Model, layer: int, result: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """ρ: each head's contribution to the residual stream as the next norm sees it, [P, H, d]."""
    r = result
    if model.arch.post_attn_norm:
        norm = model.block_module(layer, model.arch.post_attn_norm)
        gain = model.norm_gain(norm).detach().float()
        sigma = torch.sqrt((attn_out * attn_out).mean(-1) + norm_eps(norm))
        r = r * gain / sigma[:, None, None]
    if model.arch.norm_kind == "layernorm":
        r = r - r.mean(dim=-1, keepdim=True)
    return r


def active_heads(A: torch.Tensor, k_sigma: float = 2.0) -> torch.Tensor:
    """Active mask [..., heads] (bool): A > mean + k·std over the non-NaN (eligible) heads of each row
    (population std). Rows without eligible heads are all False."""
    ok = ~torch.isnan(A)
    cnt = ok.sum(-1, keepdim=True).clamp_min(1)
    x = torch.where(ok, A, torch.zeros_like(A))
    mean = x.sum(-1, keepdim=True) / cnt
    var = (torch.where(ok, (A - mean) ** 2, torch.zeros_like(A))).sum(-1, keepdim=True) / cnt
    return ok & (A > mean + k_sigma * var.sqrt())


def heads_to_explain(active: torch.Tensor, valid: torch.Tensor, low: float = 0.25, high: float = 0.75
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """For active [P, K] and valid prompt mask [P]: the active fraction per head [K] over the valid
    prompts, and the mask [K] of heads with low ≤ fraction ≤ high."""
    n = valid.sum().clamp_min(1)
    frac = (active & valid[:, None]).sum(0).float() / n
    return frac, (frac >= low) & (frac <= high) & (valid.sum() > 0)


def head_name(model: Model, k: int) -> str:
    """'L.H' for flat head index k = L·H + h."""
    return f"{k // model.n_heads}.{k % model.n_heads}"
