"""``matryoshka_batchtopk``: BatchTopK, and every prefix ``f[:, :w]`` for w in ``matryoshka_widths`` is
trained to reconstruct x on its own (Bussmann et al. 2025 / Nabeshima 2025)."""

from __future__ import annotations

from ...errors import HeadscopeError
from .batchtopk import BatchTopK


def default_matryoshka_widths(d_sae: int) -> list[int]:
    """Nested prefixes 1/16, 1/8, 1/4, 1/2 and all of the dictionary (duplicates and zeros dropped)."""
    w = sorted({max(1, d_sae // 16), max(1, d_sae // 8), max(1, d_sae // 4), max(1, d_sae // 2), d_sae})
    return w


class MatryoshkaBatchTopK(BatchTopK):
    name = "matryoshka_batchtopk"
    sparse_training = False
    sweep_knob = ("k", "mtk")

    def check(self, cfg):
        if not 1 <= cfg.k <= cfg.d_sae:
            raise HeadscopeError(f"k must be in 1..d_sae={cfg.d_sae}, got {cfg.k}")
        w = [int(v) for v in cfg.matryoshka_widths] or default_matryoshka_widths(cfg.d_sae)
        if w[-1] != cfg.d_sae:
            w.append(cfg.d_sae)
        if w[0] < 1 or any(b <= a for a, b in zip(w, w[1:])) or w[-1] != cfg.d_sae:
            raise HeadscopeError(f"matryoshka widths must increase strictly from ≥1 to d_sae={cfg.d_sae}, got {w}")
        cfg.matryoshka_widths = w

    def headscope_fields(self, cfg) -> dict:
        return {"k": cfg.k, "matryoshka_widths": list(cfg.matryoshka_widths)}

    def extra_losses(self, sae, x, out, losses, total):
        # every inner prefix reconstructs x on its own (SAELens: summed with the outer MSE)
        rec = sae.b_dec
        prev = 0
        for w in sae.cfg.matryoshka_widths[:-1]:
            rec = rec + out.acts[:, prev:w] @ sae.W_dec[prev:w]
            losses[f"mse_{w}"] = (rec - x).pow(2).sum(-1).mean()
            total = total + losses[f"mse_{w}"]
            prev = w
        return total
