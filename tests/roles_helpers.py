"""Hand-written ``heads/roles.json`` documents that keep exactly to the roles contract (docs/atlas.md § Roles),
for the verdict, label and atlas tests (the roles stage itself is tested in its own files)."""

from __future__ import annotations

import copy

ROLE_INFO = {
    "induction": ("Induction head", "attends to the token after the previous occurrence of the current token",
                  "induction score", "uniform causal attention",
                  {"task": "the second copy of repeated random-token sequences",
                   "metric": "loss on the second copy (nats/token)", "expected_sign": 1,
                   "effect_phrase": "ablating it raises the loss on the second copy of repeated text by "
                                    "{effect:.2f} [{lo:.2f}, {hi:.2f}] nats/token"}),
    "previous_token": ("Previous-token head", "attends to the previous token", "previous-token score",
                       "uniform causal attention",
                       {"task": "repeated random-token sequences", "metric": "induction score of later heads",
                        "expected_sign": -1,
                        "effect_phrase": "ablating it changes the induction scores of later heads by "
                                         "{effect:.2f} [{lo:.2f}, {hi:.2f}]"}),
    "copying": ("Copying head", "raises the logit of the token it attends to", "copying score",
                "a random token of the same context",
                {"task": "natural text", "metric": "logit of the attended token", "expected_sign": -1,
                 "effect_phrase": "ablating it changes the logit of the attended token by {effect:.2f} "
                                  "[{lo:.2f}, {hi:.2f}]"}),
    "sink": ("Attention sink", "puts most of its attention on the first token", "attention to position 0",
             "uniform causal attention", None),
}


def roles_doc(n_layers: int = 2, n_heads: int = 3, heads: dict | None = None) -> dict:
    """A roles document for an ``n_layers`` × ``n_heads`` model.

    ``heads``: {"L.H": {role: {"score", "control", "ci", "q", "passed", "effect", "effect_ci", "effect_q",
    "screen", "causal_passed"}}} — what each head measured; every other (head, role) gets score 0.01 vs
    control 0.01, not passed, not ablated. ``shown``/``confirmed`` lists are derived from the grids
    (strongest score / |effect| first), as the roles stage writes them."""
    heads = heads or {}
    L, H = n_layers, n_heads

    def grid(v):
        return [[copy.deepcopy(v) for _ in range(H)] for _ in range(L)]

    roles = {}
    for rid, (title, phrase, score_name, control_name, causal) in ROLE_INFO.items():
        r = {"title": title, "phrase": phrase, "definition": f"{score_name}: what the test measures.",
             "source": "a paper (arXiv 0000.00000)", "score_name": score_name, "control_name": control_name,
             "score": grid(0.01), "control": grid(0.01), "ci": grid([0.0, 0.02]), "p": grid(0.5),
             "q_value": grid(0.9), "passed": grid(False), "confirmed": grid(False), "causal": None}
        if causal is not None:
            r["causal"] = {**causal, "ablation": "mean", "effect": grid(None), "ci": grid(None),
                           "q_value": grid(None), "screen": grid(0.0), "passed": grid(False)}
        roles[rid] = r
    for hk, spec in heads.items():
        l, h = map(int, hk.split("."))
        for rid, s in spec.items():
            r = roles[rid]
            r["score"][l][h] = s.get("score", 0.5)
            r["control"][l][h] = s.get("control", 0.01)
            r["ci"][l][h] = s.get("ci", [r["score"][l][h] - 0.05, r["score"][l][h] + 0.05])
            r["q_value"][l][h] = s.get("q", 0.001)
            r["p"][l][h] = s.get("q", 0.001) / 10
            r["passed"][l][h] = s.get("passed", True)
            c = r["causal"]
            if c is not None and "effect" in s:
                c["effect"][l][h] = s["effect"]
                c["ci"][l][h] = s.get("effect_ci")
                c["q_value"][l][h] = s.get("effect_q", 0.001)
                c["screen"][l][h] = s.get("screen", s["effect"])
                c["passed"][l][h] = s.get("causal_passed", True)
            r["confirmed"][l][h] = bool(r["passed"][l][h] and c is not None and c["passed"][l][h])
    head_lists = {}
    for l in range(L):
        for h in range(H):
            shown = sorted((rid for rid, r in roles.items() if r["passed"][l][h]),
                           key=lambda rid: -roles[rid]["score"][l][h])
            conf = sorted((rid for rid, r in roles.items() if r["confirmed"][l][h]),
                          key=lambda rid: -abs(roles[rid]["causal"]["effect"][l][h]))
            head_lists[f"{l}.{h}"] = {"shown": shown, "confirmed": conf, "offset": None}
    return {"version": 1, "n_layers": L, "n_heads": H, "q": 0.05,
            "data": {"documents": 40, "sequences": 64, "tokens": 8192}, "roles": roles,
            "screen": {"method": "attribution patching (AtP)", "agreement": {"spearman": 0.8, "n": 40}},
            "heads": head_lists}


INDUCTION_CONFIRMED = {"score": 0.89, "control": 0.01, "effect": 0.41, "effect_ci": [0.35, 0.47]}
"""The brief's example: an induction head confirmed with its causal effect."""
