"""The offline statistical explainer for token contexts (SAE features): which tokens it fires on.

From the explainer's contexts (highlighted max-activating ones and random held-out ones), every shown
token string t (whitespace-stripped, lower-cased) gets

    a_t = number of shown positions holding t where the unit fires,  n_t = number of shown positions
    holding t,  w_t = (a_t + 1) / (n_t + 2)   (the Laplace-smoothed firing rate of t)

and the explanation lists the ``top`` tokens of largest a_t (ties: larger w_t, then alphabetical), each
with w_t, as a sentence and a machine-readable ``TOKENS`` line, e.g.::

    Fires on the tokens "def" (0.83), "class" (0.75).
    TOKENS {"def": 0.83, "class": 0.75}

Its judge reads the ``TOKENS`` line back: detection answers max w_t over the context's tokens that are
listed (0 when none is), fuzzing the mean of w_t over the marked tokens (0 for an unlisted one). So it
needs no model and no network, gives graded probabilities (AUROC is defined), and is the floor an LLM
explainer has to beat. An explanation it cannot parse (another back-end's text) is judged 0.5.
"""

from __future__ import annotations

import json
from collections import Counter

from .contexts import ExplainContextsRequest, JudgeRequest

MARK = "TOKENS "


def norm(tok: str) -> str:
    return tok.strip().lower()


class TokenStatExplainer:
    """See the module docstring."""

    name = "statistical"
    probabilities = "rule"

    def __init__(self, top: int = 5):
        self.top = top

    def config(self) -> dict:
        return {"backend": "statistical", "kind": "token-rate", "top": self.top}

    def weights(self, req: ExplainContextsRequest) -> dict[str, float]:
        a, n = Counter(), Counter()
        for c in req.active + req.random:
            fire = set(c.marked())
            for i, t in enumerate(c.tokens):
                k = norm(t)
                if not k:
                    continue
                n[k] += 1
                a[k] += i in fire
        ranked = sorted((k for k in a if a[k] > 0), key=lambda k: (-a[k], -(a[k] + 1) / (n[k] + 2), k))
        return {k: round((a[k] + 1) / (n[k] + 2), 3) for k in ranked[: self.top]}

    def explain_contexts(self, reqs: list[ExplainContextsRequest]) -> list[str]:
        out = []
        for r in reqs:
            w = self.weights(r)
            words = ", ".join(f"{json.dumps(k)} ({v:.2f})" for k, v in w.items()) or "(no token)"
            out.append(f"Fires on the tokens {words}.\n{MARK}{json.dumps(w)}")
        return out

    @staticmethod
    def parse(explanation: str) -> dict[str, float] | None:
        for line in explanation.splitlines():
            if line.startswith(MARK):
                try:
                    w = json.loads(line[len(MARK):])
                except json.JSONDecodeError:
                    return None
                return {str(k): float(v) for k, v in w.items()} if isinstance(w, dict) else None
        return None

    def judge(self, reqs: list[JudgeRequest]) -> list[float | None]:
        out = []
        for r in reqs:
            w = self.parse(r.explanation)
            if w is None:
                out.append(0.5)
            elif r.kind == "detection":
                out.append(max((w.get(norm(t), 0.0) for t in r.context.tokens), default=0.0))
            else:
                m = r.context.marked()
                out.append(sum(w.get(norm(r.context.tokens[i]), 0.0) for i in m) / len(m) if m else 0.0)
        return out
