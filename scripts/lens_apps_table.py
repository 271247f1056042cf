"""Markdown tables of the Attention Lens applications from a run's artifacts (issue 24).

    python scripts/lens_apps_table.py RUN/lens        # or a folder holding steer_eval.json / scan.json

Prints the steering table (``lens steer-eval``: per head, direction and strength the target's Δ log₂ p
with its 95 % CI over tokens, the rate in the continuation, the KL cost, the continuation perplexity,
the difference to the random direction and whether it survives BH, and the residual-stream reference at
the same KL), the classifier table (``lens scan --contrast``: held-out AUROC of the lens and of each
baseline with CIs) and the localisation summary (``lens scan``: heads beating the frequency-matched
control list after BH). docs/lens.md pastes this output verbatim.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def steering(se: dict) -> list[str]:
    tests = {(r["head"], r["direction"], r["strength"]): r for r in se["tests"]}
    out = [f"{len(se['tokens'])} target tokens ({', '.join(t.strip() for t in se['tokens'])}) × {se['n_prompts']} "
           f"held-out windows (cost: {se['n_cost_prompts']} windows of other documents); {se['new_tokens']} greedy "
           f"tokens; clean continuation perplexity {se['clean']['ppl']:.1f}. Strength: × the head's mean output "
           f"norm (head edits) or × the residual stream's mean norm (resid).", "",
           "| head | direction | strength | Δ log₂ p (bits) [95 % CI] | rate in continuation | KL (bits) | "
           "perplexity | vs random [95 % CI] | beats the control (BH) | vs resid at same KL |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for head, dirs in se["curves"].items():
        for d, pts in dirs.items():
            if pts is None:
                continue
            for p in pts:
                t = tests.get((head, d, p["strength"]))
                vs = beat = ref = ""
                if t:
                    vs = f"{t['diff']:+.2f} [{t['diff_ci'][0]:+.2f}, {t['diff_ci'][1]:+.2f}]"
                    beat = "yes" if t["passes"] else "**does not beat the control**"
                    ref = ("same edit" if d == "unembed" else "beyond its range" if t["vs_resid"] is None
                           else f"{t['vs_resid']:+.2f}")
                out.append(f"| {head} | {d} | {p['strength']:g} | {p['dlogp']:+.2f} [{p['dlogp_ci'][0]:+.2f}, "
                           f"{p['dlogp_ci'][1]:+.2f}] | {p['rate']:.2f} | {p['kl']:.3f} | {p['ppl']:.1f} | {vs} | "
                           f"{beat} | {ref} |")
    n = sum(r["passes"] for r in se["tests"])
    out += ["", f"{n}/{len(se['tests'])} head edits beat the random direction of the same norm (paired by token, "
                f"two-sided, Benjamini–Hochberg q = {se['q']})."]
    return out


def classifier(sc: dict) -> list[str]:
    c = sc["classifier"]
    out = [f"{c['n']} prompts, {c['folds']}-fold cross-validation holding out whole {c['grouped_by']}s; 95 % CIs "
           f"from a bootstrap over the {c['n_groups']} {c['grouped_by']}s; token list: "
           f"{', '.join(t.strip() for t in sc['tokens'])}.", "",
           "| features | held-out AUROC [95 % CI] | lens − this [95 % CI] |", "|---|---|---|"]
    for name, v in c["auroc"].items():
        d = c["vs_lens"].get(name)
        diff = "" if d is None else f"{d['diff']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]"
        out.append(f"| {name} | {v['auroc']:.2f} [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}] | {diff} |")
    out += ["", f"Verdict: {c['verdict']}."]
    return out


def localisation(sc: dict) -> list[str]:
    loc = sc["localisation"]
    rows = sorted(loc["per_head"].items(), key=lambda kv: -kv[1]["diff"])
    out = [f"Top-{sc['k']} of each lens (ranked by KL term) on {loc['n_prompts']} prompts; control list of the same "
           f"corpus frequency (median count {loc['frequency']['list_median']:.0f} listed vs "
           f"{loc['frequency']['control_median']:.0f} control): {', '.join(t.strip() for t in loc['control_tokens'])}.",
           "", "| head | list rate | control rate | difference ± SE | p | localised (BH) |", "|---|---|---|---|---|---|"]
    for name, v in rows[:8]:
        se = "nan" if v["se"] is None else f"{v['se']:.3f}"
        p = "nan" if v["p_value"] is None else f"{v['p_value']:.2g}"
        out.append(f"| {name} | {v['rate']:.3f} | {v['control_rate']:.3f} | {v['diff']:+.3f} ± {se} | {p} | "
                   f"{'yes' if v['localised'] else 'no'} |")
    out += ["", f"{loc['n_localised']}/{len(rows)} heads localised (one-sided, SE over prompts, "
                f"Benjamini–Hochberg q = {loc['q']}); the 8 with the largest difference shown."]
    return out


def main(folder: str) -> None:
    f = Path(folder)
    if (f / "steer_eval.json").exists():
        print("\n".join(steering(json.loads((f / "steer_eval.json").read_text()))))
    if (f / "scan.json").exists():
        sc = json.loads((f / "scan.json").read_text())
        if "classifier" in sc:
            print("\n" + "\n".join(classifier(sc)))
        if "localisation" in sc:
            print("\n" + "\n".join(localisation(sc)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/lens")
