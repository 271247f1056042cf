"""The offline explainer for attention-SAE features: where a feature reads from, as a rule (``dfa`` back-end).

An attention feature is about what its heads move: Kissane et al. (2024) sort attention-SAE features
into families by the source of their direct feature attribution (DFA, :mod:`headscope.sae.attribution`:
the feature's pre-activation split over source positions). From the DFA of each shown max-activating
example (its top sources: distance back from the activating token, the source token, and whether the
source follows an earlier copy of the activating token) the explainer writes

* the **family**: ``induction`` (in at least half of the examples the top source is the token after an
  earlier occurrence of the current token), else ``local-context`` (median distance of the top source
  ≤ ``LOCAL`` tokens) or ``long-range context``;
* the **token sets**: the destination tokens (the activating tokens, most frequent first) and the
  source tokens (the examples' top sources);
* a **rule** the scorer applies to text. Each position t of a context is put in one of four cells by
  two tests — (dest) its token is in the destination set; (source) induction: an earlier copy of
  tokens[t] has a successor before t; local: a source-set token within ``LOCAL`` tokens before t
  (t included); long-range: a source-set token anywhere before t — and each cell gets the
  Laplace-smoothed firing rate of the shown positions (max-activating and random contexts) that fall in
  it. The judge answers, for detection, the largest cell rate over the context's positions; for
  fuzzing, the mean cell rate of the marked positions.

The explanation reads like::

    Induction feature (DFA: the top source is the token after an earlier copy of the current token in
    7/10 examples, median distance 23); fires on "(" , "self" reading from "self", "def".
    DFA {"family": "induction", "dest": ["(", "self"], "source": ["self", "def"], "rates": [[0.01, 0.05], [0.2, 0.9]]}

``rates[d][s]``: d = destination test passed, s = source test passed. Sources outside a 17-token
context cannot be seen by the judge, so long-range rules fall back on their destination tokens.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np

from .contexts import ExplainContextsRequest, JudgeRequest

MARK = "DFA "
LOCAL = 8
"""Largest median source distance of a local-context feature (tokens)."""
FAMILIES = ("induction", "local-context", "long-range context")


def norm(tok: str) -> str:
    return tok.strip().lower()


def family(records: list[dict]) -> tuple[str, dict]:
    """The family of a feature from its examples' DFA ``records`` ({"sources": [{"dist", "token",
    "induction"}, …]} with the top source first) and the evidence (counts, median distance)."""
    tops = [r["sources"][0] for r in records if r.get("sources")]
    if not tops:
        return "long-range context", {"examples": 0}
    ind = sum(bool(s["induction"]) for s in tops)
    med = float(np.median([s["dist"] for s in tops]))
    ev = {"examples": len(tops), "induction": ind, "median_distance": med}
    if 2 * ind >= len(tops):
        return "induction", ev
    return ("local-context" if med <= LOCAL else "long-range context"), ev


def _source_ok(fam: str, toks: list[str], t: int, source: set[str]) -> bool:
    if fam == "induction":
        cur = toks[t]
        return any(toks[j] == cur for j in range(t - 1))          # an earlier copy whose successor lies before t
    lo = max(0, t - LOCAL) if fam == "local-context" else 0
    return any(toks[j] in source for j in range(lo, t + 1))


def cells(fam: str, dest: set[str], source: set[str], tokens: list[str]) -> list[tuple[int, int]]:
    """(destination test, source test) of every position of a context (see the module docstring)."""
    toks = [norm(t) for t in tokens]
    return [(int(toks[t] in dest), int(_source_ok(fam, toks, t, source))) for t in range(len(toks))]


class DFAExplainer:
    """See the module docstring. ``explain_contexts`` needs each request's ``dfa`` records."""

    name = "dfa"
    probabilities = "rule"

    def __init__(self, top: int = 5):
        self.top = top

    def config(self) -> dict:
        return {"backend": "dfa", "kind": "attention-source rule", "top": self.top, "local": LOCAL}

    def rule(self, req: ExplainContextsRequest) -> dict:
        recs = getattr(req, "dfa", None) or []
        fam, ev = family(recs)
        d = Counter(norm(c.tokens[i]) for c in req.active for i in c.marked())
        s = Counter(norm(r["sources"][0]["token"]) for r in recs if r.get("sources"))
        dest = [k for k, _ in sorted(d.items(), key=lambda kv: (-kv[1], kv[0])) if k][: self.top]
        source = [k for k, _ in sorted(s.items(), key=lambda kv: (-kv[1], kv[0])) if k][: self.top]
        fire = np.zeros((2, 2))
        seen = np.zeros((2, 2))
        for c in req.active + req.random:
            m = set(c.marked())
            for t, (a, b) in enumerate(cells(fam, set(dest), set(source), c.tokens)):
                seen[a, b] += 1
                fire[a, b] += t in m
        rates = ((fire + 1) / (seen + 2)).round(3).tolist()
        return {"family": fam, "evidence": ev, "dest": dest, "source": source, "rates": rates}

    def render(self, r: dict) -> str:
        ev = r["evidence"]
        if r["family"] == "induction":
            why = (f"the top source is the token after an earlier copy of the current token in "
                   f"{ev.get('induction', 0)}/{ev.get('examples', 0)} examples")
        else:
            why = f"median distance of the top source {ev.get('median_distance', 'n/a')} tokens"
        q = lambda xs: ", ".join(json.dumps(x) for x in xs) or "(none)"
        text = (f"{r['family'].capitalize()} feature (DFA: {why}); fires on {q(r['dest'])} reading from "
                f"{q(r['source'])}.")
        return text + "\n" + MARK + json.dumps({k: r[k] for k in ("family", "dest", "source", "rates")})

    def explain_contexts(self, reqs: list[ExplainContextsRequest]) -> list[str]:
        return [self.render(self.rule(r)) for r in reqs]

    @staticmethod
    def parse(explanation: str) -> dict | None:
        for line in explanation.splitlines():
            if line.startswith(MARK):
                try:
                    r = json.loads(line[len(MARK):])
                    if r["family"] in FAMILIES and len(r["rates"]) == 2:
                        return r
                except (json.JSONDecodeError, KeyError, TypeError):
                    return None
        return None

    def judge(self, reqs: list[JudgeRequest]) -> list[float | None]:
        out = []
        for q in reqs:
            r = self.parse(q.explanation)
            if r is None:
                out.append(0.5)
                continue
            cs = cells(r["family"], set(r["dest"]), set(r["source"]), q.context.tokens)
            p = [r["rates"][a][b] for a, b in cs]
            if q.kind == "detection":
                out.append(max(p, default=0.0))
            else:
                m = q.context.marked()
                out.append(sum(p[i] for i in m) / len(m) if m else 0.0)
        return out
