"""SAE feature dashboards and explanations in the layout Neuronpedia imports (files only).

Neuronpedia's exports — and its importer — read one folder per *source* (an SAE on one layer):
``<model_id>/<source_id>/`` with ``model.jsonl``, ``source.jsonl``, and gzipped JSON-lines batches
``features/batch-N.jsonl.gz``, ``activations/batch-N.jsonl.gz``, ``explanations/batch-N.jsonl.gz``,
where ``source_id = "<layer>-<source set>"``. The field names are those of Neuronpedia's own record
types (``neuronpedia_utils/db_models/{feature,activation,explanation,model,source}.py`` in the
hijohnnylin/neuronpedia repository, and its ``convert-saedashboard-to-neuronpedia-export.py``, which
writes this layout from SAEDashboard output); see docs/explain.md for the list. Every field of those
types is written, with their defaults where headscope has nothing to put.

What goes where: a feature's max-activating examples and its random examples by activation quantile
become *activations* (``tokens``, ``values`` = the feature's activation on each context token,
``maxValue``/``maxValueTokenIndex``/``minValue``; quantile examples carry ``binMin``/``binMax`` in
activation units); the dashboard's density is ``frac_nonzero``, its top/bottom logit effects
``pos_str``/``pos_values``/``neg_str``/``neg_values``; each explanation (any back-end) is an
*explanation* with ``description``, ``typeName`` = ``headscope-<backend>``, ``explanationModelName`` and
its scores in ``notes``. ``creatorId``/``authorId`` are placeholders that Neuronpedia replaces with the
uploader's account when importing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

from ..errors import HeadscopeError
from ..runs import RunDir, building_folder, inside, read_json
from .options import NeuronpediaOptions

FEATURE_DEFAULTS = {
    "creatorId": None, "createdAt": None, "maxActApprox": 0, "hasVector": False, "vector": [], "vectorLabel": None,
    "vectorDefaultSteerStrength": 10, "hookName": None, "topkCosSimIndices": [], "topkCosSimValues": [],
    "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
    "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
    "correlated_features_indices": [], "correlated_features_pearson": [], "correlated_features_l1": [],
    "neg_str": [], "neg_values": [], "pos_str": [], "pos_values": [], "frac_nonzero": 0,
    "freq_hist_data_bar_heights": [], "freq_hist_data_bar_values": [], "logits_hist_data_bar_heights": [],
    "logits_hist_data_bar_values": [], "decoder_weights_dist": []}
"""Neuronpedia's Feature fields after modelId, layer, index, with their defaults."""
ACTIVATION_OPTIONAL = {
    "dataSource": None, "dataIndex": None, "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None,
    "createdAt": None, "lossValues": [], "logitContributions": None, "binMin": None, "binMax": None,
    "binContains": None, "qualifyingTokenIndex": None}
EXPLANATION_OPTIONAL = {"embedding": None, "triggeredById": None, "typeName": None, "explanationModelName": None,
                        "notes": None, "createdAt": None}


def _id(*parts) -> str:
    """A stable 25-character id (lower-case letter then letters/digits, like Neuronpedia's cuid2 ids)."""
    h = hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()
    return "c" + h[:24]


def _stamp(rows: list[dict]) -> list[dict]:
    """createdAt/updatedAt as ISO-8601 (UTC), as Neuronpedia's exporter writes its datetimes."""
    from datetime import datetime, timezone
    now = datetime.now(timezone.utc).isoformat()
    return [{**r, **{k: now for k in ("createdAt", "updatedAt") if k in r and r[k] is None}} for r in rows]


def _write_gz(path: Path, rows: list[dict]) -> None:
    rows = _stamp(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode(), compresslevel=5))


def _activation(ex: dict, model_id: str, source: str, f: int, creator: str, kind: str, i: int,
                bin_range=None) -> dict:
    vals = [float(v) for v in ex["acts"]]
    mx = max(vals) if vals else 0.0
    rec = {"id": _id(model_id, source, f, kind, i, ex.get("seq"), ex.get("pos")), "tokens": list(ex["context"]),
           "index": str(f), "layer": source, "modelId": model_id, "maxValue": mx,
           "maxValueTokenIndex": vals.index(mx) if vals else 0, "minValue": min(vals) if vals else 0.0,
           "values": vals, "creatorId": creator, **ACTIVATION_OPTIONAL}
    rec["qualifyingTokenIndex"] = ex.get("index")
    rec["dataSource"] = "headscope held-out split"
    if bin_range is not None:
        rec["binMin"], rec["binMax"] = bin_range
    return rec


def cmd_export(run: RunDir, opts: NeuronpediaOptions) -> int:
    """``headscope export neuronpedia``."""
    r = export_neuronpedia(run, Path(opts.to), opts)
    print(f"{r['features']} features, {r['activations']} activations, {r['explanations']} explanations -> {r['folder']}")
    return 0


def export_neuronpedia(run: RunDir, out: Path, opts: NeuronpediaOptions) -> dict:
    """Write ``out/<model_id>/<source_id>/`` (see the module docstring); returns counts and the folder.
    The folder is built aside and moved in whole: a failed export leaves nothing half-written."""
    from ..explain.features import sae_name
    name = sae_name(run, opts.sae)
    folder = run / "sae" / name
    cfg = read_json(folder / "cfg.json")
    layer = cfg.get("metadata", {}).get("headscope", {}).get("layer")
    hook = cfg.get("metadata", {}).get("hook_name") or f"blocks.{layer}.attn.hook_z"
    ident = run.model_identity
    model_id = opts.model_id or str(ident.get("model", "model")).lower().replace("/", "-")
    source = f"{layer}-{opts.source_set}"
    index = read_json(folder / "dashboards/index.json")
    final = inside(Path(out), f"{model_id}/{source}", "--model-id / --source-set")
    if final.exists():
        raise HeadscopeError(f"{final} exists: remove it or export to another folder")
    expl_files = sorted((run / "explain" / "features" / name).glob("explanations_*.json"))
    scores = {}
    for sf in sorted((run / "explain" / "features" / name).glob("scores_*_by_*.json")):
        sc = read_json(sf)
        for u in sc.get("features", []):
            scores.setdefault((sc["explanations"], u["id"]), {})[sc.get("scorer", {}).get("backend", "?")] = {
                k: {kk: u[k].get(kk) for kk in ("balanced_accuracy", "shuffled_balanced_accuracy", "auroc")}
                for k in ("detection", "fuzzing") if k in u}
    explanations = []
    for ef in expl_files:
        e = read_json(ef)
        backend = ef.stem[len("explanations_"):]
        be = e.get("backend", {})
        for f, x in e["features"].items():
            s = scores.get((backend, f))
            explanations.append({"id": _id(model_id, source, f, backend), "modelId": model_id, "layer": source,
                                 "index": str(f), "description": x["explanation"].strip().splitlines()[0],
                                 "authorId": opts.creator_id, **EXPLANATION_OPTIONAL,
                                 "typeName": f"headscope-{backend}",
                                 "explanationModelName": be.get("model") or backend,
                                 "notes": json.dumps({"full_explanation": x["explanation"], "scores": s})})
    n_feat = n_act = 0
    with building_folder(final, "--to") as tmp:
        batch = 0
        feats, acts = [], []

        def flush():
            nonlocal batch, feats, acts
            if feats:
                _write_gz(tmp / "features" / f"batch-{batch}.jsonl.gz", feats)
                _write_gz(tmp / "activations" / f"batch-{batch}.jsonl.gz", acts)
                batch += 1
            feats, acts = [], []
        for p in range(int(index["pages"])):
            for f, r in read_json(folder / f"dashboards/page_{p:03d}.json")["features"].items():
                f = int(f)
                a = [_activation(ex, model_id, source, f, opts.creator_id, "top", i)
                     for i, ex in enumerate(r.get("examples", []))]
                for qi, q in enumerate(r.get("quantiles", [])):
                    rng = [q["range"][0] * r["max_act"], q["range"][1] * r["max_act"]]
                    a += [_activation(ex, model_id, source, f, opts.creator_id, f"q{qi}", i, rng)
                          for i, ex in enumerate(q["examples"])]
                lg = r.get("logits") or {}
                feats.append({"modelId": model_id, "layer": source, "index": str(f), **FEATURE_DEFAULTS,
                              "creatorId": opts.creator_id, "maxActApprox": r.get("max_act", 0), "hookName": hook,
                              "frac_nonzero": r.get("density", 0),
                              "pos_str": [t for t, _ in lg.get("top", [])], "pos_values": [v for _, v in lg.get("top", [])],
                              "neg_str": [t for t, _ in lg.get("bottom", [])],
                              "neg_values": [v for _, v in lg.get("bottom", [])]})
                acts += a
                n_feat, n_act = n_feat + 1, n_act + len(a)
                if len(feats) >= opts.batch_size:
                    flush()
        flush()
        for b in range(0, max(1, len(explanations)), opts.batch_size):
            if explanations:
                _write_gz(tmp / "explanations" / f"batch-{b // opts.batch_size}.jsonl.gz",
                          explanations[b:b + opts.batch_size])
        model_rec = {"id": model_id, "instruct": "instruct" in model_id, "creatorId": opts.creator_id,
                     "displayNameShort": model_id, "displayName": str(ident.get("model", model_id)), "tlensId": None,
                     "dimension": ident.get("d_model"), "visibility": "PUBLIC", "defaultSourceSetName": None,
                     "defaultSourceId": None, "inferenceEnabled": False, "layers": ident.get("n_layers", 0),
                     "neuronsPerLayer": 0, "createdAt": None, "owner": "", "updatedAt": None, "website": None}
        source_rec = {"id": source, "modelId": model_id, "setName": opts.source_set, "creatorId": opts.creator_id,
                      "hasDashboards": True, "inferenceEnabled": False, "inferenceHosts": [],
                      "saelensConfig": json.dumps(cfg), "saelensRelease": opts.hf_repo_id or None,
                      "saelensSaeId": hook if opts.hf_repo_id else None, "hfRepoId": opts.hf_repo_id or None,
                      "hfFolderId": hook if opts.hf_repo_id else None, "visibility": "PUBLIC",
                      "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False,
                      "hasUmapClusters": False, "num_prompts": None,
                      "num_tokens_in_prompt": (read_json(folder / "train.json").get("config", {}).get("seq_len")
                                               if (folder / "train.json").is_file() else None),
                      "dataset": "headscope held-out split", "notes": f"headscope SAE {name}", "createdAt": None}
        (tmp / "model.jsonl").write_text(json.dumps(_stamp([model_rec])[0]) + "\n")
        (tmp / "source.jsonl").write_text(json.dumps(_stamp([source_rec])[0]) + "\n")
    return {"folder": str(final), "features": n_feat, "activations": n_act, "explanations": len(explanations)}
