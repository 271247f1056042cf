"""A one-line label per head, led by its verdict, every fact with its source and only facts whose own
test passed (``headscope explain label``); with an LLM back-end, also a written summary of those facts.

Facts, in this order, only when the run holds them (an absent instrument adds nothing, never a guess):

* **verdict** (``heads/roles.json``, :mod:`headscope.heads.verdict`): the confirmed roles with their score
  vs control and causal effect, or "No role confirmed among the N tested" (shown-only roles marked
  untested causally). Without a roles file, the **head scores** (``heads/scores.json``) on which the head
  ranks in the top ``top_frac`` of all heads, as measurements with their rank (no claim);
* **lens** (``lens/eval.json``): when the lens is informative by the lens instrument's one rule (one-sided
  test, BH over heads): its gain ± SE in bits/token and the tokens of its largest KL(lens ‖ null) terms;
* **SAE** (``sae/<name>/heads.json``): the polysemanticity finding when its calibrated test passed (BH);
  the features putting most of their decoder norm on the head, each with its explanation only when that
  explanation was scored (``explain/features/<name>/scores_*``), quoted with its detection score beside
  the shuffled-explanation control;
* **neurons** (``neurons/ablation.json``): the next-token neurons whose token probability zeroing the head
  significantly lowers (BH over pairs). An attribution alone is never a fact ("drives" has no test);
* **look-ups** (``explain/scores_<backend>.json``): (neuron, head) explanations scored above chance on
  held-out prompts (a test clustered by document, BH over pairs), with E, its CI and the shuffled control.

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
from .results import LabelsResult

SUMMARY_PROMPT = """Here is what measurements say about attention head {head} of a language model:
{facts}

In one or two sentences, summarise what this head does. Use only the facts above; do not add any claim they do not support."""


def _first_line(text: str, n: int = 90) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= n else line[:n - 1] + "…"


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


def _feature_explanations(run: Path) -> dict[str, dict[str, tuple[str, str, dict | None]]]:
    """{sae: {feature: (explanation, file, detection scores or None)}} from every explanations file (an LLM's
    before the rule's); the scores are the feature's detection balanced accuracy and its shuffled control."""
    out: dict[str, dict[str, tuple[str, str, dict | None]]] = {}
    root = run / "explain" / "features"
    if not root.is_dir():
        return out
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        scores: dict[tuple[str, str], dict] = {}
        for sf in sorted(d.glob("scores_*_by_*.json")):
            sc = read_json(sf)
            for u in sc.get("features", []):
                det = u.get("detection") or {}
                if det.get("balanced_accuracy") is not None and det.get("shuffled_balanced_accuracy") is not None:
                    scores.setdefault((sc.get("explanations"), str(u["id"])), det)
        files = sorted(d.glob("explanations_*.json"), key=lambda p: p.stem.endswith("statistical"))
        for f in files:
            backend = f.stem[len("explanations_"):]
            for feat, e in read_json(f)["features"].items():
                out.setdefault(d.name, {}).setdefault(feat, (e["explanation"], str(f.relative_to(run)),
                                                             scores.get((backend, str(feat)))))
    return out


def head_facts(run_dir: Path, top_frac: float = 0.05) -> dict[str, list[dict]]:
    """Every head's facts (see the module docstring) from the run directory's artifacts."""
    from ..heads.verdict import lens_findings, load_roles, lookup_findings, neuron_findings, sae_findings, verdict
    run_dir = Path(run_dir)
    info = read_json(run_dir / "run.json")
    L, H = int(info["model"]["n_layers"]), int(info["model"]["n_heads"])
    facts: dict[str, list[dict]] = {f"{l}.{h}": [] for l in range(L) for h in range(H)}
    roles = load_roles(run_dir)
    if roles is not None:
        for hk in facts:
            v = verdict(hk, roles)
            facts[hk].append({"kind": "roles", "source": "heads/roles.json", "roles": list(v.confirmed),
                              "score": len(v.confirmed), "text": v.roles_sentence})
    elif (run_dir / "heads" / "scores.json").is_file():
        for hk, fs in _score_facts(read_json(run_dir / "heads" / "scores.json")["scores"], L, H, top_frac).items():
            facts[hk] += fs
    for part in (lens_findings(run_dir), sae_findings(run_dir)):
        for hk, fs in part.items():
            if hk in facts:
                facts[hk] += [{k: f[k] for k in ("kind", "source", "score", "text")} for f in fs]
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
                scored = ex is not None and ex[2] is not None
                if scored:
                    text += (f": {_first_line(ex[0], 70)} (detection {ex[2]['balanced_accuracy']:.2f} vs "
                             f"{ex[2]['shuffled_balanced_accuracy']:.2f} shuffled)")
                facts[hk].append({"kind": "sae", "source": ex[1] if scored else str(hj.relative_to(run_dir)),
                                  "feature": f, "sae": name, "score": tf["attribution"], "text": text})
    for hk, fs in list(neuron_findings(run_dir).items()) + list(lookup_findings(run_dir).items()):
        if hk in facts:
            facts[hk] += [{k: f[k] for k in ("kind", "source", "score", "text")} for f in fs]
    return facts


def run_labels(model, run: RunDir, opts: LabelOptions, progress: bool = True, backend=None) -> LabelsResult:
    """Write ``explain/labels.json`` (see the module docstring); returns how many heads got a label and a
    summary, and the file."""
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
    return LabelsResult(heads=sum(1 for v in heads.values() if v["label"]), summaries=n_sum, path=str(path))
