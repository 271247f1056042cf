"""A one-line label per head, assembled from what headscope measured, each fact with its source
(``headscope explain label``); with an LLM back-end, also a written summary of those facts.

Facts, in this order, only when the run holds them (an absent instrument adds nothing, never a guess):

* **head scores** (``heads/scores.json``): a score is quoted when the head ranks in the top ``top_frac``
  of all heads for it (rank among every head, so "0.41" is read against the model's own distribution);
* **lens** (``lens/eval.json``): when the lens is informative (gain > 2·SE): its gain ± SE in bits/token
  and the tokens it promotes;
* **SAE features** (``sae/<name>/heads.json`` and ``explain/features/<name>/explanations_*.json``): the
  features that attribute most to the head, with their explanations (first line) when explained;
* **driven neurons** (``neurons/attribution.json``): the next-token neurons this head drives, with the
  token each predicts; and the (neuron, head) explanation scores when scored.

``label`` is the facts joined by " · " (at most ``max_facts``). ``summary``: one or two sentences the LLM
writes from the facts alone (prompted not to add anything); None with ``summary = "none"``.
File: ``explain/labels.json`` = ``{"backend", "options", "heads": {"L.H": {"label", "facts": [{"text",
"source", "kind"}], "summary"}}}``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from ..runs import RunDir, read_json, write_json
from .options import LabelOptions

SUMMARY_PROMPT = """Here is what measurements say about attention head {head} of a language model:
{facts}

In one or two sentences, summarise what this head does. Use only the facts above; do not add any claim they do not support."""


def _first_line(text: str, n: int = 90) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= n else line[:n - 1] + "…"


def _tok(t) -> str:
    return repr(str(t))


def _score_facts(scores: dict, L: int, H: int, top_frac: float) -> dict[str, list[dict]]:
    """Per head, the scores on which it ranks in the top ``top_frac`` of all heads."""
    out: dict[str, list[dict]] = {}
    for name, grid in scores.items():
        flat = [(grid[l][h], f"{l}.{h}") for l in range(L) for h in range(H)
                if isinstance(grid[l][h], (int, float))]
        flat.sort(reverse=True)
        k = max(1, int(round(top_frac * len(flat))))
        for rank, (v, hk) in enumerate(flat[:k]):
            out.setdefault(hk, []).append({"kind": "heads", "source": "heads/scores.json", "score": v,
                                           "text": f"{name.replace('_', '-')} {v:.2f} (rank {rank + 1}/{len(flat)})"})
    return out


def _feature_explanations(run: Path) -> dict[str, dict[str, tuple[str, str]]]:
    """{sae: {feature: (explanation, file)}} from every explanations file (an LLM's before the rule's)."""
    out: dict[str, dict[str, tuple[str, str]]] = {}
    root = run / "explain" / "features"
    if not root.is_dir():
        return out
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(d.glob("explanations_*.json"), key=lambda p: p.stem.endswith("statistical"))
        for f in files:
            for feat, e in read_json(f)["features"].items():
                out.setdefault(d.name, {}).setdefault(feat, (e["explanation"], str(f.relative_to(run))))
    return out


def head_facts(run_dir: Path, top_frac: float = 0.05) -> dict[str, list[dict]]:
    """Every head's facts (see the module docstring) from the run directory's artifacts."""
    run_dir = Path(run_dir)
    info = read_json(run_dir / "run.json")
    L, H = int(info["model"]["n_layers"]), int(info["model"]["n_heads"])
    facts: dict[str, list[dict]] = {f"{l}.{h}": [] for l in range(L) for h in range(H)}
    sp = run_dir / "heads" / "scores.json"
    if sp.is_file():
        for hk, fs in _score_facts(read_json(sp)["scores"], L, H, top_frac).items():
            facts[hk] += fs
    ev = run_dir / "lens" / "eval.json"
    if ev.is_file():
        e = read_json(ev)
        for hk, v in e.get("per_head", {}).items():
            if v.get("informative") and hk in facts:
                toks = [t[0] if isinstance(t, list) else t for t in (e.get("top_tokens", {}).get(hk) or [])[:4]]
                facts[hk].append({"kind": "lens", "source": "lens/eval.json", "score": v.get("gain"),
                                  "text": f"lens gain {v['gain']:.2f}±{v.get('gain_se') or 0:.2f} bits"
                                          + (f", promotes {', '.join(map(_tok, toks))}" if toks else "")})
    fx = _feature_explanations(run_dir)
    for hj in sorted((run_dir / "sae").glob("*/heads.json")) if (run_dir / "sae").is_dir() else []:
        name = hj.parent.name
        cfg = read_json(hj.parent / "cfg.json") if (hj.parent / "cfg.json").is_file() else {}
        layer = cfg.get("metadata", {}).get("headscope", {}).get("layer")
        for h, rec in read_json(hj)["heads"].items():
            hk = f"{layer}.{h}"
            if hk not in facts:
                continue
            for tf in rec.get("top_features", [])[:3]:
                f = str(tf["feature"])
                ex = fx.get(name, {}).get(f)
                text = f"SAE {name} feature {f} ({tf['attribution']:.2f} of its decoder norm)"
                if ex:
                    text += f": {_first_line(ex[0], 70)}"
                facts[hk].append({"kind": "sae", "source": ex[1] if ex else str(hj.relative_to(run_dir)),
                                  "feature": f, "sae": name, "score": tf["attribution"], "text": text})
    att = run_dir / "neurons" / "attribution.json"
    if att.is_file():
        a = read_json(att)
        mined = a.get("neurons", [])
        by_head: dict[str, list[str]] = {}
        for p in a.get("pairs", []):
            n = mined[p["neuron"]] if p["neuron"] < len(mined) else {}
            name = f"{n.get('layer', '?')}.{n.get('neuron', p['neuron'])}"
            by_head.setdefault(p["name"], []).append(f"{name} (→ {_tok(n.get('token', '?'))})")
        for hk, ns in by_head.items():
            if hk in facts:
                facts[hk].append({"kind": "neurons", "source": "neurons/attribution.json", "score": len(ns),
                                  "text": f"drives neuron{'s' if len(ns) > 1 else ''} {', '.join(ns[:3])}"
                                          + (f" and {len(ns) - 3} more" if len(ns) > 3 else "")})
    return facts


def run_labels(model, run: RunDir, opts: LabelOptions, progress: bool = True, backend=None) -> dict:
    """Write ``explain/labels.json`` (see the module docstring); returns ``{"heads", "summaries", "path"}``."""
    facts = head_facts(run.path, opts.top_frac)
    heads = {hk: {"label": " · ".join(f["text"] for f in fs[:opts.max_facts]) if fs else None,
                  "facts": fs, "summary": None} for hk, fs in facts.items()}
    n_sum = 0
    if opts.summary != "none" or backend is not None:
        if backend is None:
            from .features import make_feature_backend
            backend = make_feature_backend(opts, run, model, backend=opts.summary)
        todo = [hk for hk, v in heads.items() if v["facts"]]
        msgs = [[{"role": "user", "content": SUMMARY_PROMPT.format(
            head=hk, facts="\n".join(f"- {f['text']}" for f in heads[hk]["facts"]))}] for hk in todo]
        bar = tqdm(total=len(todo), desc="head summaries", disable=not progress, file=sys.stderr, unit=" head")
        for s in range(0, len(todo), 16):
            for hk, text in zip(todo[s:s + 16], backend.complete_many(msgs[s:s + 16])):
                heads[hk]["summary"] = text.strip() or None
                n_sum += bool(text.strip())
            bar.update(len(todo[s:s + 16]))
        bar.close()
    path = run / "explain" / "labels.json"
    write_json(path, {"backend": opts.summary if backend is None else getattr(backend, "name", opts.summary),
                      "options": asdict(opts), "heads": heads})
    return {"heads": sum(1 for v in heads.values() if v["label"]), "summaries": n_sum, "path": str(path)}
