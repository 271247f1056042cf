"""A verdict for every head: one or two sentences that say what the head does, each claim backed by a
test that passed (``RUN/heads/roles.json``, written by the ``heads.roles`` stage) — then what the lens,
the SAE and the neuron look-ups found, again only where their own tests passed.

Reading rules (never relaxed here, whatever the artifacts hold):

* a role is **confirmed** for a head when ``roles.json`` says so: its score beat the role's control (BH over
  heads) *and* ablating the head had the effect the role predicts (expected sign, CI excluding 0, BH).
  Confirmed roles come first, strongest first (the order of ``heads[L.H].confirmed``), each with its score
  vs its control and its causal effect with CI, worded by the role's ``effect_phrase``;
* a role **shown** by its score but not confirmed is listed as such, with why (ablation not significant,
  not ablated, or no causal test for the role) — never as what the head does;
* with nothing confirmed the verdict says ``No role confirmed among the N tested.``;
* the other instruments add a finding only when their own test passed (:func:`run_findings`): the lens is
  informative (one-sided test, BH over heads: :mod:`headscope.lens.verdict`), with its tokens ranked by
  their KL(lens ‖ null) term; the SAE's calibrated polysemanticity test passed (BH); zeroing the head
  lowered a next-token neuron's token probability (one-sided bootstrap test clustered by document, BH over pairs); a look-up
  explanation (when the head is active for a neuron) scored above chance on held-out prompts (binomial,
  BH over pairs). A weight attribution without a test ("drives", "promotes") is never a finding.

``roles.json`` schema: docs/atlas.md § Roles and the contract in :func:`check_roles`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HeadscopeError
from ..runs import read_json

ROLE_KEYS = ("title", "phrase", "definition", "source", "score_name", "score", "control", "control_name", "ci",
             "p", "q_value", "passed", "causal", "confirmed")
CAUSAL_KEYS = ("task", "metric", "ablation", "effect", "ci", "q_value", "expected_sign", "effect_phrase", "screen",
               "passed")
GRID_KEYS = ("score", "control", "ci", "p", "q_value", "passed", "confirmed")


def _grid_ok(grid, L: int, H: int) -> bool:
    return isinstance(grid, list) and len(grid) == L and all(isinstance(r, list) and len(r) == H for r in grid)


def check_roles(doc, where: str = "roles.json") -> dict:
    """``doc`` when it holds every key of the roles contract with [L][H] grids; else a one-line
    HeadscopeError naming what is missing (extra keys are allowed)."""
    if not isinstance(doc, dict):
        raise HeadscopeError(f"{where} is not a JSON object: not a roles file")
    for k in ("n_layers", "n_heads", "q", "roles", "heads"):
        if k not in doc:
            raise HeadscopeError(f"{where} lacks '{k}': not a roles file of this headscope version")
    try:
        L, H = int(doc["n_layers"]), int(doc["n_heads"])
    except (TypeError, ValueError):
        raise HeadscopeError(f"{where}: n_layers/n_heads are not integers") from None
    if not isinstance(doc["roles"], dict) or not isinstance(doc["heads"], dict):
        raise HeadscopeError(f"{where}: 'roles' and 'heads' must be objects")
    for rid, r in doc["roles"].items():
        miss = [k for k in ROLE_KEYS if k not in (r if isinstance(r, dict) else {})]
        if miss:
            raise HeadscopeError(f"{where}: role '{rid}' lacks {', '.join(miss)}")
        bad = [k for k in GRID_KEYS if not _grid_ok(r[k], L, H)]
        c = r["causal"]
        if c is not None:
            miss = [k for k in CAUSAL_KEYS if k not in (c if isinstance(c, dict) else {})]
            if miss:
                raise HeadscopeError(f"{where}: role '{rid}' causal test lacks {', '.join(miss)}")
            bad += [f"causal.{k}" for k in ("effect", "ci", "q_value", "screen", "passed") if not _grid_ok(c[k], L, H)]
        if bad:
            raise HeadscopeError(f"{where}: role '{rid}': {', '.join(bad)} not a [{L}][{H}] grid")
    for hk, v in doc["heads"].items():
        if not isinstance(v, dict) or any(k not in v for k in ("shown", "confirmed")):
            raise HeadscopeError(f"{where}: head '{hk}' lacks shown/confirmed")
        unknown = [r for r in list(v["shown"]) + list(v["confirmed"]) if r not in doc["roles"]]
        if unknown:
            raise HeadscopeError(f"{where}: head '{hk}' names unknown role(s) {', '.join(map(str, unknown))}")
    return doc


def load_roles(run_dir: Path) -> dict | None:
    """``RUN/heads/roles.json`` checked against the contract, or None when the roles stage has not run."""
    path = Path(run_dir) / "heads" / "roles.json"
    if not path.is_file():
        return None
    return check_roles(read_json(path), str(path))


# -- number wording -----------------------------------------------------------------------------------
def _ok(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def num(v) -> str:
    """A measured number as the verdict prints it: 2 decimals, 2 significant digits below 0.05."""
    if not _ok(v):
        return "n/a"
    if v == 0:
        return "0.00"
    return f"{v:.2f}" if abs(v) >= 0.05 else f"{v:.2g}"


def _at(grid, L: int, H: int):
    try:
        return grid[L][H]
    except (IndexError, TypeError, KeyError):
        return None


def _parse(head: str) -> tuple[int, int]:
    try:
        L, H = (int(x) for x in str(head).split("."))
    except ValueError:
        raise HeadscopeError(f"'{head}' is not a head (write LAYER.HEAD, e.g. 18.6)") from None
    return L, H


# -- one head -----------------------------------------------------------------------------------------
def role_row(doc: dict, rid: str, head: str) -> dict:
    """One row of the head page's roles table: every number the verdict rests on for role ``rid``."""
    L, H = _parse(head)
    r = doc["roles"][rid]
    c = r.get("causal")
    row = {"role": rid, "title": r["title"], "score_name": r["score_name"], "control_name": r["control_name"],
           "score": _at(r["score"], L, H), "control": _at(r["control"], L, H), "ci": _at(r["ci"], L, H),
           "q": _at(r["q_value"], L, H), "shown": bool(_at(r["passed"], L, H)),
           "confirmed": bool(_at(r["confirmed"], L, H)) and c is not None,
           "causal": c is not None, "effect": None, "effect_ci": None, "effect_q": None, "screen": None,
           "causal_passed": False, "definition": r["definition"], "source": r["source"]}
    if c is not None:
        row.update({"effect": _at(c["effect"], L, H), "effect_ci": _at(c["ci"], L, H),
                    "effect_q": _at(c["q_value"], L, H), "screen": _at(c["screen"], L, H),
                    "causal_passed": bool(_at(c["passed"], L, H)), "metric": c["metric"], "task": c["task"],
                    "ablation": c["ablation"], "expected_sign": c.get("expected_sign")})
        if isinstance(c.get("control_effect"), list):  # the causal task's control prompts (duplicate-token: ABC)
            row.update({"control_effect": _at(c["control_effect"], L, H), "control_ci": _at(c.get("control_ci"), L, H),
                        "control_task": c.get("control_task"), "contrast": _at(c.get("contrast"), L, H),
                        "contrast_ci": _at(c.get("contrast_ci"), L, H), "contrast_q": _at(c.get("contrast_q"), L, H)})
    return row


def _title(doc: dict, rid: str, head: str, lower: bool = False) -> str:
    """The role's title, with the head's offset for a fixed-offset (local) head."""
    t = doc["roles"][rid]["title"]
    off = (doc["heads"].get(head) or {}).get("offset")
    if rid == "local" and isinstance(off, int):
        t += f" (offset {off})"
    return t[0].lower() + t[1:] if lower else t


def _vs(r: dict, row: dict) -> str:
    """'0.89 vs 0.01 uniform causal attention' (the role's score against its control)."""
    return f"{r['score_name']} {num(row['score'])} vs {num(row['control'])} under {r['control_name']}"


def effect_words(r: dict, row: dict) -> str | None:
    """The causal effect in the role's own words: its ``effect_phrase`` filled with the signed effect and CI
    (``{effect}``, ``{lo}``, ``{hi}``: "ablating it changes … by -0.120 [-0.160, -0.080]"); None when not
    ablated."""
    c = r.get("causal")
    e, ci = row.get("effect"), row.get("effect_ci")
    if c is None or not _ok(e):
        return None
    lo, hi = (ci if isinstance(ci, list) and len(ci) == 2 and all(_ok(x) for x in ci) else (math.nan, math.nan))
    try:
        text = str(c["effect_phrase"]).format(effect=e, lo=lo, hi=hi)
    except (KeyError, IndexError, ValueError):
        text = f"{c['ablation']}-ablating it changes the {c['metric']} by {e:+.2f} [{lo:.2f}, {hi:.2f}]"
    ce, cci = row.get("control_effect"), row.get("control_ci")
    if _ok(ce) and c.get("control_phrase"):  # the same ablation on the task's control prompts, beside it
        clo, chi = (cci if isinstance(cci, list) and len(cci) == 2 and all(_ok(x) for x in cci)
                    else (math.nan, math.nan))
        try:
            text += f" ({str(c['control_phrase']).format(effect=ce, lo=clo, hi=chi)})"
        except (KeyError, IndexError, ValueError):
            text += f" ({ce:+.2f} [{clo:.2f}, {chi:.2f}] on {c.get('control_task', 'the control prompts')})"
    return text.replace("[nan, nan]", "(no CI)")


def _why_not(r: dict, row: dict) -> str:
    """Why a shown role is not confirmed, in a few words."""
    if not row["causal"]:
        return "no causal test for this role: untested causally"
    if not _ok(row["effect"]):
        return "not ablated: untested causally"
    ci = row["effect_ci"]
    ci_s = f" [{num(ci[0])}, {num(ci[1])}]" if isinstance(ci, list) and len(ci) == 2 else ""
    return f"ablation effect {num(row['effect'])}{ci_s} on {r['causal']['task']}: not significant"


@dataclass(frozen=True)
class Verdict:
    """What a head does, in words, with the numbers and evidence behind every claim.

    ``text``: the verdict (one or two sentences from the roles), then the other instruments' findings.
    ``rows``: the roles table (:func:`role_row` per role tested, confirmed first, then shown, then the rest).
    ``links``: [(words, anchor id on the head page)] to the evidence."""

    head: str
    text: str
    roles_sentence: str
    confirmed: tuple[str, ...] = ()
    shown: tuple[str, ...] = ()
    n_tested: int = 0
    rows: tuple[dict, ...] = ()
    findings: tuple[dict, ...] = ()
    links: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def to_json(self) -> dict:
        return {"head": self.head, "text": self.text, "roles_sentence": self.roles_sentence,
                "confirmed": list(self.confirmed), "shown": list(self.shown), "n_tested": self.n_tested,
                "rows": list(self.rows), "findings": list(self.findings),
                "links": [{"text": t, "target": a} for t, a in self.links]}


def verdict(head: str, roles_doc: dict | None, findings: list[dict] | None = None) -> Verdict:
    """The verdict of ``head`` ("L.H") from a checked roles document (:func:`check_roles`; None: the roles
    stage has not run) and the head's passing findings from the other instruments (:func:`run_findings`).

    Confirmed roles, strongest first: "<Title>: <phrase> (<score name> 0.89 vs 0.01 under <control>);
    <effect phrase>." — the first in full, the others in a second sentence. No confirmed role: "No role
    confirmed among the N tested.", then the roles shown by their score alone, marked untested causally
    (or not significant). Findings follow, each a sentence of its own."""
    findings = list(findings or [])
    L, H = _parse(head)
    rows: list[dict] = []
    confirmed: list[str] = []
    shown: list[str] = []
    sentence = ""
    links: list[tuple[str, str]] = []
    if roles_doc is not None:
        roles = roles_doc["roles"]
        if not (0 <= L < int(roles_doc["n_layers"]) and 0 <= H < int(roles_doc["n_heads"])):
            raise HeadscopeError(f"head {head} is not in the roles file "
                                 f"({roles_doc['n_layers']} layers × {roles_doc['n_heads']} heads)")
        h = roles_doc["heads"].get(head) or {"shown": [], "confirmed": []}
        all_rows = {rid: role_row(roles_doc, rid, head) for rid in roles}
        # confirmed: as listed by the stage (strongest first) and only where the grids agree
        confirmed = [r for r in h["confirmed"] if all_rows[r]["confirmed"] and all_rows[r]["shown"]
                     and all_rows[r]["causal_passed"]]
        shown = [r for r in h["shown"] if all_rows[r]["shown"] and r not in confirmed]
        order = confirmed + shown + [r for r in roles if r not in confirmed and r not in shown]
        rows = [all_rows[r] for r in order]
        parts = []
        for i, rid in enumerate(confirmed):
            r, row = roles[rid], all_rows[rid]
            eff = effect_words(r, row)
            if i == 0:
                parts.append(f"{_title(roles_doc, rid, head)}: {r['phrase']} ({_vs(r, row)}); {eff}.")
            else:
                parts.append(f"{_title(roles_doc, rid, head, lower=True)} ({_vs(r, row)}; {eff})")
            links.append((r["title"], f"role-{rid}"))
        if len(parts) > 1:
            sentence = parts[0] + " Also confirmed: " + "; ".join(parts[1:]) + "."
        elif parts:
            sentence = parts[0]
        else:
            sentence = f"No role confirmed among the {len(roles)} tested."
            if shown:
                sentence += " Shown by score only: " + "; ".join(
                    f"{_title(roles_doc, r, head, lower=True)} ({_vs(roles[r], all_rows[r])}; "
                    f"{_why_not(roles[r], all_rows[r])})" for r in shown) + "."
                links += [(roles[r]["title"], f"role-{r}") for r in shown]
    else:
        sentence = "Roles not measured in this run (run `headscope heads roles`)."
    for f in findings:
        if f.get("anchor"):
            links.append((f.get("kind", "evidence"), f["anchor"]))
    text = " ".join([sentence] + [f["text"].rstrip(".") + "." for f in findings])
    return Verdict(head=head, text=text, roles_sentence=sentence, confirmed=tuple(confirmed), shown=tuple(shown),
                   n_tested=len(roles_doc["roles"]) if roles_doc else 0, rows=tuple(rows), findings=tuple(findings),
                   links=tuple(dict.fromkeys(links)))


# -- the other instruments' passing findings ------------------------------------------------------------
def _tok(t) -> str:
    return repr(str(t))


def lens_findings(run_dir: Path) -> dict[str, list[dict]]:
    """Heads whose lens is informative by the lens instrument's one rule (BH over heads,
    :func:`headscope.lens.verdict.from_eval`), with the tokens of the largest KL(lens ‖ null) terms."""
    ev_path = Path(run_dir) / "lens" / "eval.json"
    if not ev_path.is_file():
        return {}
    from ..lens.verdict import Q, from_eval
    ev = read_json(ev_path)
    flags = from_eval(ev) or {}
    out: dict[str, list[dict]] = {}
    for hk, v in (ev.get("per_head") or {}).items():
        if not flags.get(hk):
            continue
        toks = [t[0] if isinstance(t, list) else t for t in (ev.get("top_tokens", {}).get(hk) or [])[:4]]
        se = v.get("gain_se")
        text = (f"Its lens is informative: {num(v['gain'])}" + (f" ± {num(se)}" if _ok(se) else "")
                + f" bits/token over the null lens (one-sided test, BH q = {ev.get('q', Q)})")
        if toks:
            text += f"; largest KL(lens ‖ null) terms: {', '.join(map(_tok, toks))}"
        out.setdefault(hk, []).append({"kind": "lens", "source": "lens/eval.json", "anchor": "src-lens",
                                       "score": v.get("gain"), "text": text})
    return out


def sae_findings(run_dir: Path) -> dict[str, list[dict]]:
    """Heads the SAE's calibrated test calls polysemantic (more feature groups than both nulls, BH)."""
    root = Path(run_dir) / "sae"
    out: dict[str, list[dict]] = {}
    if not root.is_dir():
        return out
    for hj in sorted(root.glob("*/heads.json")):
        cfg = read_json(hj.parent / "cfg.json") if (hj.parent / "cfg.json").is_file() else {}
        layer = cfg.get("metadata", {}).get("headscope", {}).get("layer")
        doc = read_json(hj)
        for h, rec in (doc.get("heads") or {}).items():
            if rec.get("polysemantic") is not True or not _ok(rec.get("q_poly")):
                continue
            text = (f"SAE {hj.parent.name}: polysemantic, {rec.get('n_groups')} groups of features, more than "
                    f"both nulls (BH q = {num(rec['q_poly'])})")
            out.setdefault(f"{layer}.{h}", []).append({"kind": "sae", "source": str(hj.relative_to(run_dir)),
                                                       "anchor": "src-sae", "score": rec["q_poly"], "text": text})
    return out


def neuron_findings(run_dir: Path) -> dict[str, list[dict]]:
    """Heads whose zero-ablation significantly lowered a next-token neuron's token probability
    (``neurons/ablation.json``: per pair a one-sided bootstrap test of active − inactive drops clustered by
    document, BH over pairs)."""
    path = Path(run_dir) / "neurons" / "ablation.json"
    att = Path(run_dir) / "neurons" / "attribution.json"
    if not path.is_file():
        return {}
    doc = read_json(path)
    mined = read_json(att).get("neurons", []) if att.is_file() else []
    by: dict[str, list[dict]] = {}
    for p in doc.get("pairs") or []:
        if p.get("significant") is True and _ok(p.get("effect")) and _ok(p.get("q")):
            by.setdefault(str(p.get("name")), []).append(p)
    out: dict[str, list[dict]] = {}
    for hk, ps in by.items():
        ps.sort(key=lambda p: -p["effect"])
        names = []
        for p in ps[:3]:
            n = mined[p["neuron"]] if isinstance(p.get("neuron"), int) and p["neuron"] < len(mined) else {}
            name = f"{n.get('layer', p.get('layer', '?'))}.{n.get('neuron', p.get('neuron'))}"
            tok = f" (→ {_tok(n['token'])})" if "token" in n else ""
            names.append(f"{name}{tok} by {num(p['effect'])}, q = {num(p['q'])}")
        text = (f"Zeroing it lowers the token probability of next-token neuron{'s' if len(ps) > 1 else ''} "
                f"{'; '.join(names)}" + (f" and {len(ps) - 3} more" if len(ps) > 3 else "")
                + " (zero-ablation of its output, which also removes its mean contribution; one-sided bootstrap"
                  " test clustered by document, BH over pairs)")
        out[hk] = [{"kind": "neurons", "source": "neurons/ablation.json", "anchor": "src-neurons",
                    "score": len(ps), "text": text}]
    return out


def lookup_findings(run_dir: Path) -> dict[str, list[dict]]:
    """Heads with a (neuron, head) look-up explanation whose held-out score beat chance (``explain/
    scores_<backend>.json``: E on balanced prompts, a one-sided test against chance clustered by the prompts'
    documents — the binomial test where every prompt is its own document — BH over pairs), each quoted with
    its E, CI, test and q — and its shuffled-explanation control when the run scored one."""
    d = Path(run_dir) / "explain"
    out: dict[str, list[dict]] = {}
    if not d.is_dir():
        return out
    for sf in sorted(d.glob("scores_*.json")):
        backend = sf.stem[len("scores_"):].split("_by_")[0]
        ef = d / f"explanations_{backend}.json"
        if not ef.is_file():
            continue
        text_of = {(e.get("neuron"), e.get("name")): e.get("explanation") for e in read_json(ef).get("pairs", [])}
        for r in read_json(sf).get("pairs", []):
            if r.get("significant") is not True or not all(_ok(r.get(k)) for k in ("E", "q")):
                continue
            ex = (text_of.get((r.get("neuron"), r.get("name"))) or "").strip().splitlines()
            ci = f" [{num(r['E_low'])}, {num(r['E_high'])}]" if _ok(r.get("E_low")) and _ok(r.get("E_high")) else ""
            ctrl = f", shuffled explanation {num(r['E_control'])}" if _ok(r.get("E_control")) else ""
            test = "binomial" if r.get("interval", "wilson") == "wilson" else \
                f"sign-flip test over {r.get('documents')} documents"
            text = (f"Look-up ({backend}): when it is active for next-token neuron {r.get('neuron_layer')}."
                    f"{r.get('neuron_index')} (→ {_tok(r.get('token'))}), explained as “{ex[0][:90] if ex else '?'}” — "
                    f"E = {num(r['E'])}{ci} on held-out prompts{ctrl} ({test} vs chance, BH q = {num(r['q'])})")
            out.setdefault(str(r.get("name")), []).append({"kind": "lookup", "source": str(sf.relative_to(run_dir)),
                                                           "anchor": "src-explain", "score": r["E"], "text": text})
    return out


def run_findings(run_dir: Path) -> dict[str, list[dict]]:
    """{"L.H": [{"kind", "source", "anchor", "score", "text"}]}: every finding of the lens, SAE, neuron and
    look-up instruments that passed its own test (see the module docstring), in that order."""
    out: dict[str, list[dict]] = {}
    for part in (lens_findings(run_dir), sae_findings(run_dir), neuron_findings(run_dir), lookup_findings(run_dir)):
        for hk, fs in part.items():
            out.setdefault(hk, []).extend(fs)
    return out


def run_verdicts(run_dir: Path) -> dict[str, Verdict]:
    """Every head's verdict from the run's artifacts (heads listed in run.json's model shape)."""
    run_dir = Path(run_dir)
    info = read_json(run_dir / "run.json")
    L, H = int(info["model"]["n_layers"]), int(info["model"]["n_heads"])
    doc = load_roles(run_dir)
    if doc is not None and (int(doc["n_layers"]), int(doc["n_heads"])) != (L, H):
        raise HeadscopeError(f"{run_dir}/heads/roles.json is for {doc['n_layers']}×{doc['n_heads']} heads, "
                             f"the run's model has {L}×{H}")
    found = run_findings(run_dir)
    return {f"{l}.{h}": verdict(f"{l}.{h}", doc, found.get(f"{l}.{h}")) for l in range(L) for h in range(H)}
