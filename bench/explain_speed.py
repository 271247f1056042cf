"""Time the two explain steps the demo spends most on, on a real run directory (e.g. a copy of a demo run):

* ``stat``: the statistical explainer on the (neuron, head) requests of ``explain run`` (the top set and,
  when mined, the random set of ``explain baseline``) — built as :func:`headscope.explain.stages.run_explain`
  builds them, nothing written; ``--rules FILE`` saves the explanations (JSON) to compare two versions of the code;
* ``windows``: the random held-out windows of ``explain features`` (``_random_windows``) with the demo's
  options (the SAE's dashboards window, ``--windows`` 2000), nothing written.

Usage: PYTHONPATH=src python bench/explain_speed.py RUN_DIR [stat] [windows] [--rules FILE] [--model SPEC]
Run it once with the old code on PYTHONPATH and once with the new one; compare the seconds and the rules.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def statistical(run_dir: str, rules_path: str | None) -> None:
    from headscope.explain.stages import split_examples
    from headscope.explain.prompts import ExplainRequest
    from headscope.explain.statistical import StatisticalExplainer
    from headscope.neurons.stages import load_attribution, pair_labels, set_dir
    from headscope.runs import RunDir
    run = RunDir(run_dir)
    n_heads = int(run.model_identity["n_heads"])
    reqs = []
    for which in ("top", "random"):
        if not (set_dir(run, which) / "attribution.json").is_file():
            continue
        mined, att_json, att = load_attribution(run, which)
        for p in att_json["pairs"]:
            nrn = mined["neurons"][p["neuron"]]
            labels, split = pair_labels(att, n_heads, p)
            xs, ys, _ = split_examples(nrn, labels, split, 0)
            reqs.append((which, ExplainRequest([x for x, y in zip(xs, ys) if y][:10],
                                               [x for x, y in zip(xs, ys) if not y][:10], nrn["token"])))
    se = StatisticalExplainer()
    t = time.perf_counter()
    texts = []
    for s in range(0, len(reqs), 16):             # run_explain's chunks
        texts += se.explain_many([r for _, r in reqs[s:s + 16]])
    secs = time.perf_counter() - t
    rules = [se.parse(x) for x in texts]
    n_top = sum(w == "top" for w, _ in reqs)
    print(f"statistical explainer: {len(reqs)} requests ({n_top} top, {len(reqs) - n_top} random) in {secs:.2f} s "
          f"({secs / max(1, len(reqs)) * 1000:.0f} ms each; {sum(bool(r['terms']) for r in rules)} rules with terms)",
          flush=True)
    if rules_path:
        with open(rules_path, "w") as f:
            json.dump(texts, f, indent=0)


def windows(run_dir: str, n: int, per_seq: int | None = None, model_spec: str = "default") -> None:
    from headscope.data import TokenCorpus
    from headscope.explain.features import _random_windows, _records, sae_name
    from headscope.models import load_model
    from headscope.runs import RunDir, read_json
    from headscope.sae.io import load_sae
    model = load_model(model_spec)
    run = RunDir(run_dir, model.identity())
    name = sae_name(run, "")
    folder = run / "sae" / name
    _, recs = _records(folder)
    sae = load_sae(folder, model).to(model.device)
    cfg = read_json(folder / "train.json")["config"]
    corpus = TokenCorpus(model, cfg.get("corpus", "default"), seq_len=cfg.get("seq_len", sae.cfg.context_size),
                         progress=False)
    widths = [(e["index"], len(e["context"]) - e["index"] - 1) for r in recs.values() for e in r["examples"]]
    left, right = max(w[0] for w in widths), max(w[1] for w in widths)
    t = time.perf_counter()
    kw = {} if per_seq is None else {"per_seq": per_seq}    # the new code's option (default: its default)
    out = _random_windows(model, sae, corpus, n, left, right, 0, progress=False, **kw)
    secs = time.perf_counter() - t
    wins = out[0] + out[1] if isinstance(out, tuple) else out
    print(f"random held-out windows: {len(wins)} windows [{left}+1+{right}] of SAE {name} from "
          f"{corpus.n_sequences('heldout')} held-out sequences in {secs:.1f} s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("what", nargs="*", default=["stat", "windows"], choices=["stat", "windows"])
    ap.add_argument("--rules", default=None)
    ap.add_argument("--windows", type=int, default=2000)
    ap.add_argument("--per-seq", type=int, default=None)
    ap.add_argument("--model", default="default", help="the model RUN_DIR was made with (windows)")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    if "stat" in a.what:
        statistical(a.run, a.rules)
    if "windows" in a.what:
        windows(a.run, a.windows, a.per_seq, a.model)


if __name__ == "__main__":
    main()
