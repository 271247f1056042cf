"""The polysemanticity test's power on a trained SAE, at several planted cosines, and what it costs.

    python bench/sae_power.py RUN --name L18 --out docs/sae_power.json [--cos 0.3 0.5 0.7] [--n-planted 32]
        [--repeats 2]

Copies the SAE's files (cfg, weights, feature counts) from RUN into a temporary run — RUN itself is only
read — and runs ``sae.analysis`` (``run_analysis``) there at the stage defaults, once per cosine, plus
``--repeats`` timed runs with and without the power estimate. Writes ``--out`` with, per cosine, the
summary power and each head's verdict and detections by group size, the stage's seconds with and
without the power estimate, and the within-group decoder-block cosines of the groups the test found
(what the planted cosine is to be compared with). docs/sae.md quotes this file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from headscope.models.load import load_model
from headscope.runs import RunDir, read_json
from headscope.sae.analysis import run_analysis
from headscope.sae.io import load_sae
from headscope.sae.options import AnalysisOptions


def group_cosines(folder: Path) -> dict:
    """Pairwise cosines of the head blocks inside the groups heads.json found: {median, q25, q75, n}."""
    sae = load_sae(folder)
    H, Dh, F = sae.cfg.n_heads, sae.cfg.d_head, sae.cfg.d_sae
    dec = sae.W_dec.detach().float().reshape(F, H, Dh)
    cos = []
    for h, rec in read_json(folder / "heads.json")["heads"].items():
        for grp in rec["groups"]:
            b = dec[grp, int(h)]
            b = b / b.norm(dim=-1, keepdim=True)
            cos += (b @ b.T)[np.triu_indices(len(grp), 1)].tolist()
    if not cos:
        return {"n": 0}
    q25, med, q75 = np.quantile(cos, [0.25, 0.5, 0.75])
    return {"median": round(float(med), 3), "q25": round(float(q25), 3), "q75": round(float(q75), 3), "n": len(cos)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--name", default="L18")
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cos", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--n-planted", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    model = load_model(a.model)
    src = Path(a.run) / "sae" / a.name
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp) / "run", model.identity())
        dst = run.path / "sae" / a.name
        dst.mkdir(parents=True)
        for f in ("cfg.json", "sae_weights.safetensors", "feature_counts.safetensors"):
            if (src / f).is_file():
                shutil.copy(src / f, dst / f)
        out = {"run": str(a.run), "name": a.name, "torch_threads": torch.get_num_threads(), "by_cos": {},
               "seconds": {"without_power": [], "with_power": []}}
        run_analysis(model, run, AnalysisOptions(name=a.name, n_planted=0), progress=False)   # warm-up
        for _ in range(a.repeats):
            for key, n in (("without_power", 0), ("with_power", a.n_planted)):
                t = time.perf_counter()
                run_analysis(model, run, AnalysisOptions(name=a.name, n_planted=n), progress=False)
                out["seconds"][key].append(round(time.perf_counter() - t, 2))
        for cos in a.cos:
            res = run_analysis(model, run, AnalysisOptions(name=a.name, n_planted=a.n_planted, planted_cos=cos),
                               progress=False)
            heads = read_json(dst / "heads.json")["heads"]
            out["by_cos"][str(cos)] = {
                "power": res.power,
                "heads": {h: {"verdict": v["verdict"], "q_poly": round(v["q_poly"], 4),
                              "null_mean_k2": v["null_mean_k2"],
                              "detected": {g: x["detected"] for g, x in v["power"]["by_group_size"].items()}}
                          for h, v in heads.items()}}
            print(cos, {g: f"{x['detected']}/{x['planted']}" for g, x in res.power["by_group_size"].items()}, flush=True)
        out["summary"] = {k: v for k, v in res.to_json().items() if k != "power"}
        out["found_group_cosines"] = group_cosines(dst)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["seconds"]), json.dumps(out["found_group_cosines"]))


if __name__ == "__main__":
    main()
