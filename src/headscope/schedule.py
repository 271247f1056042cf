"""The learning-rate schedule of every headscope trainer (the lens refinement and the SAE trainer).

One formula, :func:`lr_at`: linear warm-up over ``warmup`` steps, constant, then linear decay to 0 over the
last ``decay_frac`` of the ``total`` steps. The lens trainer decays over all its steps (``decay_frac=1``),
the SAE trainer over the last ``decay_frac`` (0.2 by default).
"""

from __future__ import annotations


def lr_at(lr: float, step: int, total: int, warmup: int, decay_frac: float) -> float:
    """Learning rate at ``step`` (0-based) of ``total`` steps.

    ``lr · min(1, (step + 1) / warmup)`` (no warm-up when ``warmup`` is 0 or 1), times, from step
    ``int(total · (1 − decay_frac))`` on (when ``decay_frac > 0``), ``(total − step) / (total − that step)``:
    the last step of the schedule gets ``lr / span``, never 0, and a step past ``total`` gets 0.

    Floats: the decay factor is one correctly rounded division of two integers. The SAE trainer computed
    exactly this expression before the two schedules were merged (bit-identical). The lens trainer computed
    ``1 − step / total`` (two roundings); its learning rates are bit-identical where ``total`` is a power of
    two (its default: 4 steps; the demo's lenses: no refinement step) and otherwise differ from the old
    ones by at most one ulp of ``lr`` (at the last steps that is up to ~160 ulps of the small value
    itself), ``tests/test_schedule.py``.
    """
    out = lr * min(1.0, (step + 1) / max(1, warmup))
    decay_start = int(total * (1 - decay_frac))
    if decay_frac > 0 and step >= decay_start:
        out *= max(0.0, (total - step) / max(1, total - decay_start))
    return out
