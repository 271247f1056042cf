"""The deterministic keyword-contrast baseline: the word n-grams that best separate active from
inactive examples, and a scorer that answers Yes when an example contains one of them.

For each word n-gram (n = 1..``max_n``, lower-cased words ``[a-z0-9_]+`` of the example text), its
contrast is ``frac_active − frac_inactive``, the fractions of active and inactive examples that contain
it. The explanation lists the ``top`` n-grams of largest positive contrast (ties: longer n-gram, then
alphabetical), each appearing in at least two active examples when there are two or more, as a JSON list
after a fixed sentence, so that the scorer reads it back from the explanation text alone. It needs no
model and no network, and is the floor an LLM explainer has to beat.
"""

from __future__ import annotations

import json
import re

from .prompts import ClassifyRequest, ExplainRequest

PREFIX = "Active when the text contains any of: "
_WORD = re.compile(r"[a-z0-9_]+")


def ngrams(text: str, max_n: int) -> set[str]:
    words = _WORD.findall(text.lower())
    return {" ".join(words[i:i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1)}


def contrast(active: list[str], inactive: list[str], max_n: int = 2) -> list[tuple[str, float, int]]:
    """(n-gram, frac_active − frac_inactive, active count) for every n-gram of the active examples."""
    A = [ngrams(x, max_n) for x in active]
    I = [ngrams(x, max_n) for x in inactive]
    vocab = set().union(*A) if A else set()
    out = []
    for g in vocab:
        ca = sum(g in s for s in A)
        ci = sum(g in s for s in I)
        out.append((g, ca / max(1, len(A)) - ci / max(1, len(I)), ca))
    return out


class KeywordBaseline:
    """Explainer and scorer in one; see the module docstring."""

    name = "keyword"

    def __init__(self, top: int = 3, max_n: int = 2):
        self.top, self.max_n = top, max_n

    def config(self) -> dict:
        return {"backend": "keyword", "top": self.top, "max_n": self.max_n}

    def keywords(self, req: ExplainRequest) -> list[str]:
        min_count = 2 if len(req.active) >= 2 else 1
        scored = [c for c in contrast(req.active, req.inactive, self.max_n) if c[1] > 0 and c[2] >= min_count]
        scored.sort(key=lambda c: (-c[1], -len(c[0].split()), c[0]))
        return [c[0] for c in scored[: self.top]]

    def explain_many(self, reqs: list[ExplainRequest]) -> list[str]:
        return [PREFIX + json.dumps(self.keywords(r)) for r in reqs]

    @staticmethod
    def parse(explanation: str) -> list[str]:
        if not explanation.startswith(PREFIX):
            return []
        try:
            kws = json.loads(explanation[len(PREFIX):])
        except json.JSONDecodeError:
            return []
        return [k for k in kws if isinstance(k, str)]

    def classify_many(self, reqs: list[ClassifyRequest]) -> list[float | None]:
        out = []
        for r in reqs:
            kws = self.parse(r.explanation)
            grams = ngrams(r.example, self.max_n)
            out.append(1.0 if any(k in grams for k in kws) else 0.0)
        return out
