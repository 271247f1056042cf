"""The neuron instrument's data for the head atlas (JSON-ready, small, paged-friendly).

``atlas_data(run_dir)`` → ``{"per_head": {"L.H": {...}}, "neurons": {"L.N": {...}}, "summary": {...}}``
or None when ``RUN/neurons/attribution.json`` does not exist.

* per_head["L.H"]: ``n_neurons`` (pairs to explain whose head this is), ``max_frac_active``,
  ``mean_drop_active`` / ``mean_drop_inactive`` (ablation, when run), and ``neurons``: the list of
  those pairs ``{neuron: "L.N", token, frac_train, frac_test, mean_A, drop_active, drop_inactive}``;
  ``also_active``: the neurons on some of whose prompts the head is active outside the 25–75 % band of
  the pairs (``{neuron, token, frac_train, frac_test, mean_A}``, most active first, at most ``MAX_ALSO``).
* neurons["L.N"]: layer, neuron, token, dot, cos, kurtosis, skew, ``top_tokens``, ``heads`` (every head
  active on at least one prompt, with fractions), ``explain`` (the 25–75 % heads), and ``prompts``
  (up to 10 train and 5 held-out prompts with per-token activations ``tokens``/``acts``).
"""

from __future__ import annotations

from pathlib import Path

from ..runs import read_json

MAX_TRAIN, MAX_TEST = 10, 5
MAX_ALSO = 20
"""Most neurons listed per head under ``also_active``."""


def atlas_data(run_dir: Path) -> dict | None:
    d = Path(run_dir) / "neurons"
    if not (d / "attribution.json").is_file():
        return None
    found = {(n["layer"], n["neuron"]): n for n in read_json(d / "find.json")["neurons"]} if (d / "find.json").is_file() else {}
    mined = read_json(d / "mine.json")["neurons"] if (d / "mine.json").is_file() else []
    att = read_json(d / "attribution.json")
    abl = read_json(d / "ablation.json") if (d / "ablation.json").is_file() else None
    drops = {(p["neuron"], p["name"]): p for p in abl["pairs"]} if abl else {}
    per_head: dict[str, dict] = {}
    neurons: dict[str, dict] = {}
    for i, n in enumerate(att["neurons"]):
        key = f"{n['layer']}.{n['neuron']}"
        f = found.get((n["layer"], n["neuron"]), {})
        m = mined[i] if i < len(mined) else {"train": [], "test": []}
        neurons[key] = {
            "layer": n["layer"], "neuron": n["neuron"], "token": n["token"],
            **{k: f.get(k) for k in ("dot", "cos", "kurtosis", "skew")},
            "top_tokens": [t[1] for t in f.get("top_tokens", [])],
            "n_train": n["n_train"], "n_test": n["n_test"], "n_pairs": len(n["explain"]),
            "explain": n["explain"], "heads": n["heads"],
            "prompts": [{"split": s, "tokens": p["tokens"], "acts": p["acts"], "act": p["act"]}
                        for s, ps, k in (("train", m["train"], MAX_TRAIN), ("test", m["test"], MAX_TEST))
                        for p in ps[:k]],
        }
        for h in n["explain"]:
            st = n["heads"].get(h, {})
            dr = drops.get((i, h), {})
            entry = per_head.setdefault(h, {"n_neurons": 0, "max_frac_active": 0.0, "neurons": []})
            entry["n_neurons"] += 1
            entry["max_frac_active"] = max(entry["max_frac_active"], st.get("frac_train", 0.0))
            entry["neurons"].append({"neuron": key, "token": n["token"], **st,
                                     "drop_active": dr.get("mean_drop_active"),
                                     "drop_inactive": dr.get("mean_drop_inactive")})
        for h, st in n["heads"].items():   # heads active on some of its prompts, outside the 25–75 % band
            if h in n["explain"] or not (st.get("frac_train", 0.0) > 0 or st.get("frac_test", 0.0) > 0):
                continue
            entry = per_head.setdefault(h, {"n_neurons": 0, "max_frac_active": 0.0, "neurons": []})
            entry.setdefault("also_active", []).append({"neuron": key, "token": n["token"], **st})
    for entry in per_head.values():
        if "also_active" in entry:
            entry["also_active"].sort(key=lambda x: -(x.get("frac_train", 0.0) + x.get("frac_test", 0.0)))
            del entry["also_active"][MAX_ALSO:]
        a = [x["drop_active"] for x in entry["neurons"] if x["drop_active"] is not None]
        ia = [x["drop_inactive"] for x in entry["neurons"] if x["drop_inactive"] is not None]
        if a:
            entry["mean_drop_active"] = sum(a) / len(a)
        if ia:
            entry["mean_drop_inactive"] = sum(ia) / len(ia)
    summary = {"n_neurons": len(neurons), "n_pairs": len(att["pairs"]), "options": att.get("options", {})}
    if abl:
        summary["ablation"] = abl["summary"]
        vs = Path(run_dir) / "neurons" / "ablation_vs_random.json"
        if vs.is_file():
            summary["ablation"] = {**abl["summary"], "vs_random": read_json(vs)}
    return {"per_head": per_head, "neurons": neurons, "summary": summary}
