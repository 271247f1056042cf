"""The atlas's "Start here" list: the heads with the strongest findings, each with a one-line reason.

:func:`highlights` reads only what the run's instruments already computed (the atlas sources of
:func:`headscope.atlas.collect.collect`, plus the neurons' ``ablation.json``) and lists at most ``limit``
(8) heads, no head twice: ``[{"head": "L.H", "reason": str, "source": instrument, "also": [str, ...]}]``.
A run may hold any subset of the instruments; a missing one adds nothing.

**Candidates**, each list ordered strongest first, each only from findings that pass the instrument's
own rule:

* ``roles`` (``heads/roles.json``, when the run has it: it then replaces the raw head scores below): per
  role, the heads where it is *confirmed* (score beat its control and ablation had the predicted effect,
  both BH), ranked by their causal effect in the role's direction; the roles are ordered by the
  standardised effect (effect / SE from its CI) of their strongest head, so the first round lists the
  clearest causal finding of every role. The reason is the verdict's sentence for that role (score vs
  control, effect with CI). Roles confirmed by a *small* effect (expected sign 0: attention sinks, whose
  ablation barely moves the output) are findings of the verdict, not of this list.

* ``heads`` (repeated random tokens, :mod:`headscope.heads.scores`): the 2 highest induction and the 2
  highest previous-token scores, each only when it is above the median head *and* at least
  ``UNIFORM_FACTOR`` (2) times what uniform attention would give on the same positions (mean of 1/(t+1)
  over the scored destinations t: the "no effect" reference; an untrained model's heads sit at about
  1×). Head scores have no significance test, so the reason gives the rank among the scored heads, the
  median and the uniform reference (with the factor) instead of a p-value.
* ``lens``: the 3 heads with the largest held-out information gain among those the lens instrument calls
  *informative* (one-sided test, Benjamini–Hochberg over heads: ``headscope.lens.verdict``); a head that
  is not informative is never listed, whatever its gain. The reason gives gain ± SE (bits/token) and the
  control lens's gain.
* ``sae``: per SAE, the 2 heads called *polysemantic* by the calibrated test (more feature groups than
  both nulls, BH q ≤ 0.05; lowest q first), then the one head with the most top features that put over
  half of their decoder-norm (weight attribution, rows sum to 1) on it — "over half" is the rule named in
  the reason, next to the even share 1/H.
* ``neurons``: the 2 heads whose zero-ablation lowers P(neuron's token) significantly for the most
  next-token neurons (per pair: one-sided bootstrap test, clustered by document, of the drops on prompts
  where the head is active vs not, BH q < 0.05 over the pairs, as ``headscope.neurons.stages.run_ablate``
  decides); ties by the
  mean effect. Attribution alone (a head active on 25–75 % of a neuron's prompts) has no test and lists
  nothing.

**Merge.** Round robin over the candidate lists in the order roles (one list per role) — or, without
roles, induction and previous-token scores —, lens, SAE polysemantic, SAE attribution, neurons: each round takes the next head of every list, so every
instrument with a finding is on the first screen before any gets a second head. A head met again keeps
its first reason and collects the others in ``also``.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

LIMIT = 8
"""Most heads on the Start-here card."""
UNIFORM_FACTOR = 2.0
"""A head score is a finding from this many times the uniform-attention reference."""
PER_SCORE, PER_LENS, PER_SAE_POLY, PER_NEURONS = 2, 3, 2, 2
"""Most candidates each kind of finding contributes."""
SCORE_LABELS = {"induction": "induction", "prev_token": "previous-token"}


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _ordinal(i: int) -> str:
    if i == 1:
        return "highest"
    suffix = "th" if 10 <= i % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(i % 10, "th")
    return f"{i}{suffix} highest"


def _decimals(se: float | None) -> int:
    """Decimals that show an SE with two significant digits (3 without one; at most 6)."""
    if se is None or se <= 0:
        return 3
    return int(min(6, max(3, 1 - math.floor(math.log10(se)))))


def uniform_reference(name: str, half_len: int) -> float | None:
    """Mean attention a head spreading uniformly over its causal context puts on the scored position:
    mean of 1/(t+1) over the destinations t of the score (:func:`headscope.heads.scores.repeat_scores`:
    induction t = L+1..2L, previous-token t = 1..2L, with L = ``half_len``)."""
    ts = {"induction": range(half_len + 1, 2 * half_len + 1), "prev_token": range(1, 2 * half_len + 1)}.get(name)
    return None if not ts else sum(1.0 / (t + 1) for t in ts) / len(ts)


def score_candidates(heads: dict, name: str, k: int = PER_SCORE) -> list[dict]:
    """The ``k`` highest heads of one head score, above the median and ≥ UNIFORM_FACTOR × uniform attention."""
    vals = [(hk, d[name]) for hk, d in (heads.get("per_head") or {}).items()
            if isinstance(d, dict) and _num(d.get(name))]
    if not vals:
        return []
    vals.sort(key=lambda x: -x[1])
    med = statistics.median(v for _, v in vals)
    half = (heads.get("config") or {}).get("half_len")
    uni = uniform_reference(name, int(half)) if _num(half) and half >= 1 else None
    label = SCORE_LABELS.get(name, name)
    out = []
    for rank, (hk, v) in enumerate(vals[:k], 1):
        if v <= med or (uni is not None and v < UNIFORM_FACTOR * uni):
            break
        ref = f"median {med:.2f}" + (f"; uniform attention {uni:.3f}, listed from {UNIFORM_FACTOR:g}×"
                                     if uni is not None else "")
        out.append({"head": hk, "source": "heads",
                    "reason": f"{label} score {v:.2f}, {_ordinal(rank)} of {len(vals)} heads ({ref})"})
    return out


def _z(row: dict) -> float:
    """Standardised causal effect of a roles-table row: |effect| / SE, SE from the 95 % CI's width."""
    ci = row.get("effect_ci")
    if not (isinstance(ci, list) and len(ci) == 2 and all(_num(x) for x in ci)) or ci[1] <= ci[0]:
        return 0.0
    return abs(row["effect"]) / ((ci[1] - ci[0]) / 3.92)


def role_candidates(heads: dict, k: int = PER_SCORE) -> list[list[dict]]:
    """Per role with a confirmed head, its ``k`` heads with the largest causal effect (in the role's
    direction); the lists ordered by their best head's standardised effect (module docstring)."""
    by_role: dict[str, list[tuple[float, float, str, dict]]] = {}
    titles = {rid: r.get("title", rid) for rid, r in (heads.get("roles") or {}).items() if isinstance(r, dict)}
    for hk, d in (heads.get("per_head") or {}).items():
        v = (d or {}).get("roles") if isinstance(d, dict) else None
        if not isinstance(v, dict):
            continue
        for row in v.get("rows") or []:
            if row.get("confirmed") and _num(row.get("effect")) and row.get("expected_sign") != 0:  # not no-ops
                by_role.setdefault(row["role"], []).append((abs(row["effect"]), _z(row), hk, row))
    lists = []
    for rid, xs in by_role.items():
        xs.sort(key=lambda x: (-x[0], -x[1]))
        out = []
        for _, z, hk, row in xs[:k]:
            ci = row.get("effect_ci") or [None, None]
            out.append({"head": hk, "source": "roles", "z": z,
                        "reason": f"{titles.get(rid, rid)} confirmed: {row['score_name']} {row['score']:.2f} vs "
                                  f"{row['control']:.2f} ({row['control_name']}); {row.get('ablation', 'mean')}-"
                                  f"ablation effect on the {row.get('metric', 'task metric')} "
                                  f"{row['effect']:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}], q = {row['effect_q']:.2g}"
                                  if all(_num(x) for x in (*ci, row.get("effect_q"), row.get("score"), row.get("control")))
                                  else f"{titles.get(rid, rid)} confirmed (causal effect {row['effect']:+.2f})"})
        lists.append(out)
    lists.sort(key=lambda xs: -max(x["z"] for x in xs))
    for xs in lists:
        for x in xs:
            x.pop("z")
    return lists


def lens_candidates(lens: dict, k: int = PER_LENS) -> list[dict]:
    """The ``k`` informative lens heads (BH rule of the lens instrument) with the largest gain."""
    per_head = lens.get("per_head") or {}
    inf = [(hk, d) for hk, d in per_head.items()
           if isinstance(d, dict) and d.get("informative") is True and _num(d.get("gain"))]
    inf.sort(key=lambda x: -x[1]["gain"])
    summ = lens.get("summary") or {}
    rule = summ.get("rule") or "one-sided test, BH q = 0.05"
    ctrl = [c.get("gain") for c in (summ.get("control") or {}).values() if isinstance(c, dict) and _num(c.get("gain"))]
    out = []
    for hk, d in inf[:k]:
        se = d.get("gain_se") if _num(d.get("gain_se")) else None
        dec = _decimals(se)
        pm = f" ± {se:.{dec}f}" if se is not None else ""
        tail = f"; control lens {ctrl[0]:.{dec}f}" if ctrl else ""
        out.append({"head": hk, "source": "lens",
                    "reason": f"lens information gain {d['gain']:.{dec}f}{pm} bits/token, informative ({rule}; "
                              f"{len(inf)} of {len(per_head)} lensed heads){tail}"})
    return out


def _sae_records(sae: dict) -> dict[str, list[tuple[str, dict]]]:
    """{sae name: [(head, record), ...]} from the per-head ``sae`` lists."""
    by: dict[str, list[tuple[str, dict]]] = {}
    for hk, d in (sae.get("per_head") or {}).items():
        for rec in (d.get("sae") or []) if isinstance(d, dict) else []:
            if isinstance(rec, dict):
                by.setdefault(str(rec.get("sae")), []).append((hk, rec))
    return by


def sae_poly_candidates(sae: dict, k: int = PER_SAE_POLY) -> list[dict]:
    """Per SAE, the ``k`` heads its calibrated test calls polysemantic, lowest q first."""
    out = []
    for name, recs in _sae_records(sae).items():
        poly = [(hk, r) for hk, r in recs if r.get("polysemantic") is True and _num(r.get("q_poly"))]
        poly.sort(key=lambda x: (x[1]["q_poly"], -(x[1].get("n_groups") or 0)))
        for hk, r in poly[:k]:
            out.append({"head": hk, "source": "sae",
                        "reason": f"SAE {name}: polysemantic, {r.get('n_groups')} feature groups, more than both "
                                  f"nulls (BH q = {r['q_poly']:.3f})"})
    return out


def sae_attribution_candidates(sae: dict, n_heads: int) -> list[dict]:
    """Per SAE, the head with the most top features putting over half their decoder norm on it."""
    out = []
    for name, recs in _sae_records(sae).items():
        best = None
        for hk, r in recs:
            atts = [f["attribution"] for f in r.get("top_features") or []
                    if isinstance(f, dict) and _num(f.get("attribution"))]
            n_major = sum(a > 0.5 for a in atts)
            if n_major and (best is None or (n_major, max(atts)) > best[0]):
                best = ((n_major, max(atts)), hk, len(atts))
        if best is not None:
            (n_major, top), hk, n = best
            out.append({"head": hk, "source": "sae",
                        "reason": f"SAE {name}: {n_major} of its {n} top features put over half their decoder "
                                  f"weight on this head (largest share {top:.2f}; even share 1/{n_heads} = "
                                  f"{1 / max(n_heads, 1):.2f})"})
    return out


def neuron_candidates(ablation: dict | None, k: int = PER_NEURONS) -> list[dict]:
    """The ``k`` heads whose ablation significantly lowers the most neurons' token probability.

    ``ablation``: the neurons' ``ablation.json`` (``pairs``: [{neuron, name, effect, q, significant}])."""
    pairs = [p for p in (ablation or {}).get("pairs") or [] if isinstance(p, dict) and p.get("name")]
    tested: dict[str, set] = {}
    sig: dict[str, dict] = {}
    for p in pairs:
        tested.setdefault(p["name"], set()).add(p.get("neuron"))
        if p.get("significant") is True and _num(p.get("effect")):
            sig.setdefault(p["name"], {})[p.get("neuron")] = p["effect"]
    ranked = sorted(sig.items(), key=lambda x: (-len(x[1]), -statistics.fmean(x[1].values())))
    out = []
    for hk, effs in ranked[:k]:
        n = len(effs)
        out.append({"head": hk, "source": "neurons",
                    "reason": f"zeroing it lowers P(next token) for {n} of the {len(tested[hk])} next-token "
                              f"neuron{'s' if len(tested[hk]) != 1 else ''} it drives (zero-ablation; one-sided bootstrap "
                              f"clustered by document, BH q < 0.05 over {len(pairs)} pairs; mean effect "
                              f"{statistics.fmean(effs.values()):+.3f})"})
    return out


def load_neuron_ablation(run_dir: Path) -> dict | None:
    """``RUN/neurons/ablation.json`` (the congruent set's ablations), or None when absent/unreadable."""
    path = Path(run_dir) / "neurons" / "ablation.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def highlights(sources: dict, n_heads: int, neuron_ablation: dict | None = None, limit: int = LIMIT) -> list[dict]:
    """The Start-here list (module docstring): ``[{"head", "reason", "source", "also"}]``, at most ``limit``."""
    heads, lens, sae = (sources.get(s) or {} for s in ("heads", "lens", "sae"))
    first = (role_candidates(heads) if heads.get("roles")
             else [score_candidates(heads, "induction"), score_candidates(heads, "prev_token")])
    lists = first + [lens_candidates(lens), sae_poly_candidates(sae), sae_attribution_candidates(sae, n_heads),
                     neuron_candidates(neuron_ablation if "neurons" in sources else None)]
    out: list[dict] = []
    seen: dict[str, dict] = {}
    for rnd in range(max((len(c) for c in lists), default=0)):
        for cands in lists:
            if rnd >= len(cands):
                continue
            c = cands[rnd]
            if c["head"] in seen:
                if c["reason"] not in seen[c["head"]]["also"]:
                    seen[c["head"]]["also"].append(c["reason"])
            elif len(out) < limit:
                seen[c["head"]] = {**c, "also": []}
                out.append(seen[c["head"]])
    return out
