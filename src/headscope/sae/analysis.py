"""Per-head view of an SAE: ``run_analysis(model, run, name) -> dict``.

Writes ``sae/<name>/attribution.safetensors`` (key ``weight_attribution`` [F, H]) and
``sae/<name>/heads.json``: for each head h (key ``"h"``) its top features by weight attribution with
their top output tokens, its feature groups and the polysemanticity estimate (criterion in
:mod:`.attribution`). Features that never fired during ``sae eval`` (``feature_counts.safetensors``)
are left out when that file exists.
"""

from __future__ import annotations

from ..models.load import Model
from ..runs import RunDir, read_tensors, write_json, write_tensors
from .attribution import head_features, weight_attribution
from .io import load_sae
from .train import sae_dir


def run_analysis(model: Model, run: RunDir, name: str, top_n: int = 10, cos_threshold: float = 0.3,
                 token_jaccard: float = 0.2) -> dict:
    folder = sae_dir(run, name)
    sae = load_sae(folder, model)
    alive = None
    if (folder / "feature_counts.safetensors").is_file():
        alive = read_tensors(folder / "feature_counts.safetensors")["counts"] > 0
    w = weight_attribution(sae)
    write_tensors(folder / "attribution.safetensors", {"weight_attribution": w})
    heads = head_features(model, sae, alive, top_n=top_n, cos_threshold=cos_threshold, token_jaccard=token_jaccard)
    res = {"name": name, "layer": sae.cfg.layer, "criterion": {"top_n": top_n, "cos_threshold": cos_threshold,
                                                               "token_jaccard": token_jaccard},
           "alive_known": alive is not None,
           "heads": {str(h): v for h, v in heads.items()},
           "polysemantic_frac": sum(v["polysemantic"] for v in heads.values()) / max(1, len(heads))}
    write_json(folder / "heads.json", res)
    run.mark_done(f"sae/{name}/analysis", {"polysemantic_frac": res["polysemantic_frac"]})
    return res
