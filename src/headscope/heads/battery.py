"""Per-unit measurements of the role scores (what ``roles.py`` turns into scores, controls, CIs and BH).

Every function returns values per independent unit (a sequence, an example or a task token), so the
confidence intervals can be clustered by the unit's document or sequence. Shapes: n units, L layers,
H heads, S positions, Dh head dim, d model dim.

Natural text (:func:`text_stats`, one pass with eager attention over held-out windows ``[BOS] + window``;
destination positions t ≥ 1 only, BOS is never a destination):

* ``sink`` [n, L, H]: mean over t ≥ 1 of A[t, 0] (Gu et al.'s α_0).
* ``offset`` [n, L, H, 8]: for k = 1..8, mean over t ≥ 9 of A[t, t − k]; ``far`` [n, L, H]: mean over t ≥ 9
  of the attention to sources 1 ≤ s < t − 8 (position 0 left out of every offset bin).
* ``copy_att`` / ``copy_rand`` [n, L, H]: the head's direct logit contribution, mean over t ≥ 2, to the token
  at the source s* = argmax_{1 ≤ s ≤ t} A[t, s] it attends to most, and to the token at a random position
  of the same context 1 ≤ s ≤ t whose token differs from it (the control). The contribution is
  z_h(t)·W_O^h·P·diag(γ_f)·W_Uc[x]ᵀ / σ(t): the final norm's actual scale σ(t) at that position, W_U
  centred over the vocabulary.
"""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from ..capture import capture
from ..models.load import Model
from .ov import W_O_folded, readout

MAX_OFFSET = 8


def final_scale(model: Model, resid: torch.Tensor) -> torch.Tensor:
    """σ(t) of the final norm for the residual stream resid [..., d] entering it, [...]."""
    x = resid.float()
    if model.arch.norm_kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    eps = float(getattr(model.final_norm, "eps", getattr(model.final_norm, "variance_epsilon", 1e-6)))
    return x.pow(2).mean(-1).add(eps).sqrt()


def attended_sources(pattern: torch.Tensor) -> torch.Tensor:
    """argmax_{1 ≤ s ≤ t} A[t, s] for every destination, [B, H, S] (t = 0 gives 0), from pattern [B, H, S, S]."""
    p = pattern.float().clone()
    p[..., 0] = -1.0
    src = p.argmax(-1)
    src[..., 0] = 0
    return src


def random_other_sources(ids: torch.Tensor, src: torch.Tensor, generator: torch.Generator,
                         tries: int = 16) -> torch.Tensor:
    """For each (b, h, t ≥ 1), a uniformly random position 1 ≤ s ≤ t whose token differs from ids[b, src[b, h, t]]
    (rejection sampling, ``tries`` rounds; the rare destination whose context has no other token keeps its
    last draw), [B, H, S]. ids [B, S], src [B, H, S]."""
    B, H, S = src.shape
    t = torch.arange(S).clamp_min(1).expand(B, H, S)
    idsx = ids[:, None, :].expand(-1, H, -1)
    target = torch.gather(idsx, 2, src)
    out = torch.ones(B, H, S, dtype=torch.long)
    redo = torch.ones(B, H, S, dtype=torch.bool)
    for _ in range(tries):
        draw = 1 + (torch.rand(B, H, S, generator=generator) * t).long().clamp_max(S - 1)
        draw = torch.minimum(draw, t)
        out = torch.where(redo, draw, out)
        redo = torch.gather(idsx, 2, out) == target
        if not redo.any():
            break
    return out


def direct_logit(model: Model, z: torch.Tensor, W_O: torch.Tensor, targets: list[torch.Tensor],
                 sigma: torch.Tensor, B: torch.Tensor) -> list[torch.Tensor]:
    """Direct logit contribution of each head to target tokens per (b, h, t): z [B, S, H, Dh], W_O [H, Dh, d],
    each of ``targets`` [B, H, S] token ids, sigma [B, S], B = :func:`readout` [d, V] → one [B, H, S] per target."""
    r = torch.einsum("bshk,hkd->bhsd", z.float(), W_O.float()) / sigma[:, None, :, None]  # [B, H, S, d]
    return [(r * B.T[t]).sum(-1) for t in targets]


@torch.no_grad()
def text_stats(model: Model, batches, n: int, seed: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """The natural-text measurements above for the windows of ``batches`` (an iterable of (ids [B, S], docs)),
    n windows in all."""
    L, H = model.n_layers, model.n_heads
    out = {k: torch.zeros(n, L, H) for k in ("sink", "far", "copy_att", "copy_rand")}
    out["offset"] = torch.zeros(n, L, H, MAX_OFFSET)
    g = torch.Generator().manual_seed(seed)
    Bread = readout(model)
    W_O = [W_O_folded(model, l) for l in range(L)]
    i = 0
    bar = tqdm(total=n, desc="head roles (natural text)", disable=not progress, file=sys.stderr)
    for ids, _ in batches:
        Bsz, S = ids.shape
        t9 = torch.arange(MAX_OFFSET + 1, S)
        srcs: dict[int, torch.Tensor] = {}

        def reduce(layer, p, t9=t9):  # [B, H, S, S] -> [B, H, 2 + 8] (sink, far, offsets); keeps argmax sources
            p = p.float()
            srcs[layer] = attended_sources(p).cpu()
            sink = p[:, :, 1:, 0].mean(-1)
            offs = torch.stack([p[:, :, t9, t9 - k].mean(-1) for k in range(1, MAX_OFFSET + 1)], -1)
            cums = p.cumsum(-1)  # cums[..., t, t - 9] = Σ_{s ≤ t − 9} A[t, s]
            far = (cums[:, :, t9, t9 - MAX_OFFSET - 1] - p[:, :, t9, 0]).mean(-1)
            return torch.cat([sink[..., None], far[..., None], offs], -1).cpu()

        got = capture(model, ids, what=("pattern", "z", "resid_post"), reduce={
            "pattern": reduce, "resid_post": lambda l, x: x if l == L - 1 else x[:, :0]})
        sigma = final_scale(model, got["resid_post"][L - 1])  # [B, S]
        rows = slice(i, i + Bsz)
        for l in range(L):
            s = got["pattern"][l]
            out["sink"][rows, l] = s[..., 0]
            out["far"][rows, l] = s[..., 1]
            out["offset"][rows, l] = s[..., 2:]
            src = srcs[l]
            att_tok = torch.gather(ids[:, None, :].expand(-1, H, -1), 2, src)
            rnd_tok = torch.gather(ids[:, None, :].expand(-1, H, -1), 2, random_other_sources(ids, src, g))
            z = got["z"][l]
            a, r = direct_logit(model, z, W_O[l], [att_tok, rnd_tok], sigma, Bread)
            out["copy_att"][rows, l] = a[..., 2:].mean(-1)
            out["copy_rand"][rows, l] = r[..., 2:].mean(-1)
        i += Bsz
        bar.update(Bsz)
    bar.close()
    return out
