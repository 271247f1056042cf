"""SAELens on-disk format (v6): a folder with ``cfg.json`` and ``sae_weights.safetensors``.

Written: ``architecture`` (``standard``/``topk``), ``d_in``, ``d_sae``, ``dtype``, ``device``,
``apply_b_dec_to_input: true``, ``normalize_activations: "none"``, ``reshape_activations: "hook_z"``
(d_in ordered (n_heads, d_head)), ``k`` and ``rescale_acts_by_decoder_norm: false`` for TopK, and
``metadata`` with ``sae_lens_version`` (a config without one is parsed by SAELens as its old flat
format), ``model_name``, ``hook_name`` (``blocks.L.attn.hook_z``), ``hook_head_index: null``,
``context_size``, ``prepend_bos``, ``dataset_path``. headscope's own fields (model identity, layer,
heads) are kept under ``metadata.headscope``; SAELens ignores them. ``sparsity.safetensors`` (key
``sparsity``, log10 firing frequency) is written by ``sae eval``.

Loading accepts folders written by SAELens too: the layer is parsed from ``hook_name``, the head
count from ``n_heads`` in the metadata or the model it is checked against.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import HeadscopeError
from ..runs import read_json, read_tensors, write_json, write_tensors
from .model import AttnSAE, SAEConfig

SAE_LENS_VERSION = "6.0.0"
"""Written as ``sae_lens_version`` when SAELens is not installed (the format version this writes)."""
WEIGHTS = "sae_weights.safetensors"
CFG = "cfg.json"
KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _sae_lens_version() -> str:
    try:
        from importlib.metadata import version
        return version("sae-lens")
    except Exception:
        return SAE_LENS_VERSION


def save_sae(sae: AttnSAE, path: str | Path) -> Path:
    """Write ``sae`` to folder ``path`` in SAELens format (weights first, config last: a folder
    without ``cfg.json`` is not a complete SAE)."""
    path = Path(path)
    c = sae.cfg
    write_tensors(path / WEIGHTS, {k: getattr(sae, k).detach().float() for k in KEYS})
    cfg = {
        "architecture": c.architecture,
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "hook_z",
        "metadata": {
            "sae_lens_version": _sae_lens_version(),
            "sae_lens_training_version": None,
            "model_name": c.model.get("model", ""),
            "hook_name": c.hook_name,
            "hook_head_index": None,
            "context_size": c.context_size,
            "prepend_bos": True,
            "dataset_path": c.dataset,
            "n_heads": c.n_heads,
            "d_head": c.d_head,
            "headscope": {"layer": c.layer, "model": c.model},
        },
    }
    if c.architecture == "topk":
        cfg["k"] = c.k
        cfg["rescale_acts_by_decoder_norm"] = False
    write_json(path / CFG, cfg)
    return path


def load_sae(path: str | Path, model=None, layer: int | None = None) -> AttnSAE:
    """Load an SAE folder (written here or by SAELens). With ``model`` the SAE is checked against
    it (same model identity when recorded, d_in = H·Dh); with ``layer`` its layer must match."""
    path = Path(path)
    if not path.is_dir():
        raise HeadscopeError(f"SAE folder does not exist: {path}")
    cfg = read_json(path / CFG)
    if not isinstance(cfg, dict) or "d_in" not in cfg or "d_sae" not in cfg:
        raise HeadscopeError(f"{path / CFG} is not an SAE config (no d_in/d_sae)")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else cfg  # v5 flat configs
    arch = cfg.get("architecture", "standard")
    if arch not in ("standard", "topk"):
        raise HeadscopeError(f"SAE architecture '{arch}' in {path} is not supported (standard, topk)")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise HeadscopeError(f"SAE in {path} normalises its inputs ({cfg['normalize_activations']}); "
                             "only 'none' is supported")
    hook = meta.get("hook_name") or ""
    m = re.fullmatch(r"blocks\.(\d+)\.attn\.hook_z", hook)
    hs = meta.get("headscope") or {}
    saved_layer = hs.get("layer", int(m.group(1)) if m else None)
    if saved_layer is None:
        raise HeadscopeError(f"SAE in {path} is not an attention-output (hook_z) SAE: hook_name '{hook}'")
    if cfg.get("reshape_activations", "hook_z") not in ("hook_z", "none") or meta.get("hook_head_index") is not None:
        raise HeadscopeError(f"SAE in {path} reads one head only (hook_head_index); headscope needs whole-layer z SAEs")
    n_heads = meta.get("n_heads") or (model.n_heads if model is not None else None)
    if n_heads is None:
        raise HeadscopeError(f"SAE in {path} does not record n_heads; load it with a model")
    d_in = int(cfg["d_in"])
    if d_in % int(n_heads):
        raise HeadscopeError(f"SAE in {path} has d_in {d_in}, not divisible by {n_heads} heads")
    scfg = SAEConfig(d_in=d_in, d_sae=int(cfg["d_sae"]), n_heads=int(n_heads), d_head=d_in // int(n_heads),
                     layer=int(saved_layer), architecture=arch, k=int(cfg.get("k", 32) or 32),
                     model=hs.get("model", {"model": meta.get("model_name", "")}),
                     context_size=int(meta.get("context_size") or 128), dataset=str(meta.get("dataset_path") or ""))
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        pass  # folded below: equivalent once decoder rows are unit norm
    w = read_tensors(path / WEIGHTS)
    missing = [k for k in KEYS if k not in w]
    if missing:
        raise HeadscopeError(f"{path / WEIGHTS} lacks {', '.join(missing)}")
    shapes = {"W_enc": (d_in, scfg.d_sae), "b_enc": (scfg.d_sae,), "W_dec": (scfg.d_sae, d_in), "b_dec": (d_in,)}
    for k, shp in shapes.items():
        if tuple(w[k].shape) != shp:
            raise HeadscopeError(f"{path / WEIGHTS}: {k} has shape {tuple(w[k].shape)}, config says {shp}")
        if not torch.isfinite(w[k]).all():
            raise HeadscopeError(f"{path / WEIGHTS}: {k} contains NaN or inf")
    sae = AttnSAE(scfg)
    with torch.no_grad():
        for k in KEYS:
            getattr(sae, k).copy_(w[k].float())
        if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
            # SAELens multiplies pre-activations by ‖W_dec[f]‖; fold that into the encoder.
            norms = sae.W_dec.norm(dim=1)
            sae.W_enc.mul_(norms)
            sae.b_enc.mul_(norms)
            sae.W_dec.div_(norms[:, None])
    if model is not None:
        check_sae_for(sae, model, layer)
    elif layer is not None and layer != scfg.layer:
        raise HeadscopeError(f"SAE in {path} was trained on layer {scfg.layer}, not layer {layer}")
    return sae


def check_sae_for(sae: AttnSAE, model, layer: int | None = None) -> None:
    """Raise unless ``sae`` fits ``model`` (identity, d_in, layer range) and, if given, ``layer``."""
    c = sae.cfg
    if c.model and "unembed_sha1" in c.model:
        model.check_identity(c.model, what="SAE")
    if c.d_in != model.n_heads * model.d_head or c.n_heads != model.n_heads:
        raise HeadscopeError(f"SAE has d_in {c.d_in} ({c.n_heads} heads), but {model.name} has z of width "
                             f"{model.n_heads * model.d_head} ({model.n_heads} heads × {model.d_head})")
    model.check_layer(c.layer)
    if layer is not None and layer != c.layer:
        raise HeadscopeError(f"SAE was trained on layer {c.layer}, not layer {layer}")
