"""The one learning-rate schedule (``headscope.schedule.lr_at``) against the two it replaced, written out here
as they were: bit-identical floats for the SAE trainer everywhere and for every step a demo run uses, and
for the lens trainer wherever its step count is a power of two (its default: 4 steps), else
within one ulp of ``lr``."""

from __future__ import annotations

import math

import pytest

from headscope.schedule import lr_at
from headscope.study import builtin_config, load_config, plan


def old_sae_lr(lr, warmup_steps, decay_frac, step, n_steps):
    """``headscope.sae.train.lr_at`` before the merge (cfg fields passed one by one)."""
    out = lr * min(1.0, (step + 1) / max(1, warmup_steps))
    decay_start = int(n_steps * (1 - decay_frac))
    if decay_frac > 0 and step >= decay_start:
        out *= max(0.0, (n_steps - step) / max(1, n_steps - decay_start))
    return out


def old_lens_lr(lr, warmup, step, total):
    """``headscope.lens.train.lr_at`` before the merge."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    decay = 1.0 - step / total if total else 1.0
    return lr * warm * max(decay, 0.0)


def _demo_steps():
    """(config, the sae.train options, the lens.train options) of each shipped study config."""
    out = []
    for name in ("demo", "ci"):
        steps = {stage.name: opts for stage, opts in plan(load_config(builtin_config(name))).steps}
        out.append((name, steps["sae.train"], steps["lens.train"]))
    return out


@pytest.mark.parametrize("name,sae,lens", _demo_steps(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_step_of_the_shipped_studies_is_bit_identical(name, sae, lens):
    n = sae.n_steps()
    assert n >= 16
    for step in range(n):
        assert lr_at(sae.lr, step, n, sae.warmup_steps, sae.decay_frac) == \
            old_sae_lr(sae.lr, sae.warmup_steps, sae.decay_frac, step, n), (name, step)
    total = lens.steps()
    for step in range(total):   # the shipped studies use the closed-form lenses: no refinement step
        assert lr_at(lens.lr, step, total, lens.warmup, 1.0) == old_lens_lr(lens.lr, lens.warmup, step, total)


def test_sae_schedule_is_bit_identical_everywhere():
    for lr in (1e-3, 2e-3, 3e-4, 0.7):
        for n in list(range(1, 200)) + [1000, 4883, 9766]:
            for warmup in (0, 1, 5, 10, 100):
                for frac in (0.0, 0.1, 0.2, 0.5, 1.0):
                    for step in range(n):
                        assert lr_at(lr, step, n, warmup, frac) == old_sae_lr(lr, warmup, frac, step, n), \
                            (lr, n, warmup, frac, step)


def test_lens_schedule_is_bit_identical_on_powers_of_two_and_within_an_ulp_of_lr_elsewhere():
    from headscope.lens.options import LensTrainConfig
    assert LensTrainConfig().steps() == 4                     # the default refinement
    differ = 0
    for lr in (3e-4, 1e-2, 3e-2, 0.7):
        for total in range(1, 300):
            for warmup in (0, 1, 3, 10):
                for step in range(total):
                    new, old = lr_at(lr, step, total, warmup, 1.0), old_lens_lr(lr, warmup, step, total)
                    if (total & (total - 1)) == 0:            # 1, 2, 4, …, 256 steps
                        assert new == old, (lr, total, warmup, step)
                    assert abs(new - old) <= math.ulp(lr), (lr, total, warmup, step)
                    differ += new != old
    assert differ > 0                                         # not bit-identical off the powers of two


def test_the_schedule_warms_up_holds_and_decays():
    lr, total = 1e-3, 100
    v = [lr_at(lr, s, total, 10, 0.2) for s in range(total)]
    assert v[0] == pytest.approx(lr / 10) and v[9] == lr and all(x == lr for x in v[9:80])
    assert all(a > b for a, b in zip(v[80:], v[81:])) and v[-1] == pytest.approx(lr / 20)
    assert lr_at(lr, total, total, 10, 0.2) == 0.0 and lr_at(lr, total + 5, total, 10, 0.2) == 0.0
    lens = [lr_at(lr, s, 8, 1, 1.0) for s in range(8)]        # the lens: decay over every step
    assert lens == [lr * (8 - s) / 8 for s in range(8)]
    assert [lr_at(lr, s, 8, 0, 0.0) for s in range(8)] == [lr] * 8
    assert math.isclose(sum(lr_at(1.0, s, 1000, 0, 1.0) for s in range(1000)), 500.5)
