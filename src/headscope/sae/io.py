"""SAELens on-disk format (v6): a folder with ``cfg.json`` and ``sae_weights.safetensors``.

**Written** (readable by ``sae_lens.SAE.load_from_disk``): ``architecture``, ``d_in``, ``d_sae``,
``dtype``, ``device``, ``apply_b_dec_to_input: true``, ``normalize_activations: "none"``,
``reshape_activations: "hook_z"`` (d_in ordered (n_heads, d_head)), ``k`` and
``rescale_acts_by_decoder_norm: false`` for TopK, and ``metadata`` with ``sae_lens_version`` (a config
without one is parsed by SAELens as its old flat format), ``model_name``, ``hook_name``
(``blocks.L.attn.hook_z``), ``hook_head_index``, ``context_size``, ``prepend_bos``, ``dataset_path``.
BatchTopK and Matryoshka SAEs are written as SAELens writes them for inference: ``architecture:
"jumprelu"`` with a per-feature ``threshold``; their training architecture, ``k`` and widths are kept,
with headscope's own fields (model identity, layer), under ``metadata.headscope`` (SAELens ignores
them). Per-head SAEs are written Dh wide with ``hook_head_index``. ``sparsity.safetensors`` (key
``sparsity``, log10 firing frequency) is written by ``sae eval``.

**Read**: any folder SAELens writes (``save_model`` or ``save_inference_model``) or converts to, of the
architectures ``standard``, ``gated``, ``topk``, ``jumprelu``, ``batchtopk``, ``matryoshka_batchtopk``
(the last two in training form, with their global ``topk_threshold``), on ``blocks.L.attn.hook_z``,
either whole-layer (d_in = H·Dh, ``reshape_activations`` ``hook_z`` or flattened ``none``) or one head
(``hook_head_index`` = h, d_in = Dh). Folded on load so that headscope's map
``(x − b_dec)·W_enc + b_enc`` equals SAELens' exactly: ``apply_b_dec_to_input: false`` (Gemma Scope;
b_enc += b_dec·W_enc), ``rescale_acts_by_decoder_norm`` (W_enc, b_enc ·= ‖W_dec‖, W_dec /= ‖W_dec‖),
``log_threshold`` (older JumpReLU files). Anything else is refused with one line naming what cannot be
mapped: another hook (e.g. ``hook_attn_out`` SAEs, whose decoder lives in the residual stream, not z),
per-token input normalisation, a missing tensor, mismatched shapes.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import HeadscopeError
from ..runs import read_json, read_tensors, write_json, write_tensors
from .architectures import get as get_architecture
from .model import ARCHITECTURES, THRESHOLDED, AttnSAE, SAEConfig, param_names

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
    a = get_architecture(c.architecture)
    w = {k: getattr(sae, k).detach().float().cpu() for k in sae.param_names()}
    for ours, theirs in a.saelens_renames.items():   # gated: b_enc is SAELens' b_gate
        w[theirs] = w.pop(ours)
    d_in = c.d_in
    if c.head_index is not None:   # back to the Dh-wide per-head form SAELens uses
        sl = slice(c.head_index * c.d_head, (c.head_index + 1) * c.d_head)
        w["W_enc"], w["W_dec"], w["b_dec"] = w["W_enc"][sl], w["W_dec"][:, sl], w["b_dec"][sl]
        d_in = c.d_head
    write_tensors(path / WEIGHTS, {k: v.contiguous() for k, v in w.items()})
    arch = a.saelens_name   # BatchTopK / Matryoshka: their inference form, a JumpReLU
    hs = {"layer": c.layer, "model": c.model, "architecture": c.architecture, **a.headscope_fields(c)}
    cfg = {
        "architecture": arch,
        "d_in": d_in,
        "d_sae": c.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if c.head_index is None else "none",
        "metadata": {
            "sae_lens_version": _sae_lens_version(),
            "sae_lens_training_version": None,
            "model_name": c.model.get("model", ""),
            "hook_name": c.hook_name,
            "hook_head_index": c.head_index,
            "context_size": c.context_size,
            "prepend_bos": True,
            "dataset_path": c.dataset,
            "n_heads": c.n_heads,
            "d_head": c.d_head,
            "headscope": hs,
        },
    }
    cfg.update(a.saelens_fields(c))
    write_json(path / CFG, cfg)
    return path


def _need(w: dict, keys, where) -> None:
    missing = [k for k in keys if k not in w]
    if missing:
        raise HeadscopeError(f"{where} lacks {', '.join(missing)}")


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
    hs = meta.get("headscope") or {}
    arch = cfg.get("architecture") or "standard"
    k = cfg.get("k")
    if cfg.get("activation_fn") == "topk" or (cfg.get("activation_fn_kwargs") or {}).get("k"):
        arch, k = "topk", (cfg.get("activation_fn_kwargs") or {}).get("k", k)   # old SAELens TopK configs
    if arch not in ARCHITECTURES:
        raise HeadscopeError(f"SAE architecture '{arch}' in {path} is not supported ({', '.join(ARCHITECTURES)})")
    if arch == "jumprelu" and hs.get("architecture") in THRESHOLDED:
        arch = hs["architecture"]   # a BatchTopK / Matryoshka SAE saved in its inference (JumpReLU) form
    k = hs.get("k", k)
    hook = meta.get("hook_name") or ""
    m = re.fullmatch(r"blocks\.(\d+)\.attn\.hook_z", hook)
    saved_layer = hs.get("layer", int(m.group(1)) if m else None)
    if saved_layer is None:
        raise HeadscopeError(f"SAE in {path} reads '{hook}', not attention z (blocks.L.attn.hook_z): "
                             "its features cannot be mapped to heads")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise HeadscopeError(f"SAE in {path} normalises its inputs at run time (normalize_activations={norm!r}), "
                             "which cannot be folded into the weights; fold the dataset norm factor in "
                             "(SAELens: sae.fold_activation_norm_scaling_factor) and save it with 'none'")
    if cfg.get("finetuning_scaling_factor"):
        raise HeadscopeError(f"SAE in {path} has a finetuning scaling factor, which headscope cannot map")
    head_index = meta.get("hook_head_index")
    n_heads = meta.get("n_heads") or (model.n_heads if model is not None else None)
    if n_heads is None:
        raise HeadscopeError(f"SAE in {path} does not record n_heads; load it with a model")
    n_heads = int(n_heads)
    d_in = int(cfg["d_in"])
    if head_index is not None:
        head_index = int(head_index)
        d_head = int(meta.get("d_head") or d_in)
        if d_head != d_in:
            raise HeadscopeError(f"SAE in {path} reads head {head_index} but has d_in {d_in}, not d_head {d_head}")
    else:
        if cfg.get("reshape_activations", "hook_z") not in ("hook_z", "none", None):
            raise HeadscopeError(f"SAE in {path} has reshape_activations={cfg['reshape_activations']!r}; "
                                 "expected 'hook_z' or 'none'")
        if d_in % n_heads:
            raise HeadscopeError(f"SAE in {path} has d_in {d_in}, not divisible by {n_heads} heads")
        d_head = d_in // n_heads
    F = int(cfg["d_sae"])
    widths = hs.get("matryoshka_widths") or cfg.get("matryoshka_widths") or []
    scfg = SAEConfig(d_in=n_heads * d_head, d_sae=F, n_heads=n_heads, d_head=d_head, layer=int(saved_layer),
                     architecture=arch, k=int(k or 32) if arch != "standard" else 32,
                     model=hs.get("model", {"model": meta.get("model_name", "")}),
                     context_size=int(meta.get("context_size") or 128), dataset=str(meta.get("dataset_path") or ""),
                     matryoshka_widths=list(widths), head_index=head_index)
    w = {key: v.float() for key, v in read_tensors(path / WEIGHTS).items()}
    where = path / WEIGHTS
    a = get_architecture(arch)
    if a.saelens_renames:   # gated: SAELens' b_gate is b_enc
        _need(w, [a.saelens_renames.get(n, n) for n in a.param_names], where)
        for ours, theirs in a.saelens_renames.items():
            w[ours] = w.pop(theirs)
    _need(w, KEYS, where)
    if a.thresholded:
        if "threshold" not in w and "log_threshold" in w:
            w["threshold"] = w.pop("log_threshold").exp()
        if "threshold" not in w and "topk_threshold" in w:   # BatchTopK in training form: one global threshold
            w["threshold"] = torch.full((F,), float(w.pop("topk_threshold")))
        _need(w, ("threshold",), where)
    shapes = {"W_enc": (d_in, F), "b_enc": (F,), "W_dec": (F, d_in), "b_dec": (d_in,), "threshold": (F,),
              "r_mag": (F,), "b_mag": (F,)}
    for n in param_names(arch):
        if tuple(w[n].shape) != shapes[n]:
            raise HeadscopeError(f"{where}: {n} has shape {tuple(w[n].shape)}, config says {shapes[n]}")
        if not torch.isfinite(w[n]).all():
            raise HeadscopeError(f"{where}: {n} contains NaN or inf")
    if not cfg.get("apply_b_dec_to_input", True):
        # SAELens encodes x·W_enc + b_enc; headscope (x − b_dec)·W_enc + b_enc′ with b_enc′ = b_enc + b_dec·W_enc
        w.update(a.fold_input_bias(w))
    if cfg.get("rescale_acts_by_decoder_norm") and a.uses_k:
        # SAELens multiplies pre-activations by ‖W_dec[f]‖ and divides activations by it before decoding:
        # fold that into the encoder (the threshold compares the rescaled pre-activation, so it stays).
        nrm = w["W_dec"].norm(dim=1).clamp_min(1e-8)
        w["W_enc"], w["b_enc"], w["W_dec"] = w["W_enc"] * nrm, w["b_enc"] * nrm, w["W_dec"] / nrm[:, None]
    if head_index is not None:   # embed the Dh-wide SAE in the H·Dh space
        sl = slice(head_index * d_head, (head_index + 1) * d_head)
        W_enc = torch.zeros(scfg.d_in, F)
        W_enc[sl] = w["W_enc"]
        W_dec = torch.zeros(F, scfg.d_in)
        W_dec[:, sl] = w["W_dec"]
        b_dec = torch.zeros(scfg.d_in)
        b_dec[sl] = w["b_dec"]
        w["W_enc"], w["W_dec"], w["b_dec"] = W_enc, W_dec, b_dec
    sae = AttnSAE(scfg)
    with torch.no_grad():
        for n in sae.param_names():
            getattr(sae, n).copy_(w[n])
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


def import_sae(src: str | Path, dest: str | Path, model, layer: int | None = None) -> AttnSAE:
    """Load a pretrained SAE and write it to ``dest`` in headscope's SAELens format (folded: what
    headscope and SAELens both read back with equal encodings). ``src``: a SAELens folder, or a Gemma
    Scope ``params.npz`` (JumpReLU on z, ``W_enc [H·Dh, F]``, ``W_dec``, ``b_enc``, ``b_dec``,
    ``threshold``; encoded as ``x·W_enc + b_enc``) whose layer is ``layer`` or read from a
    ``layer_<L>`` part of its path."""
    import tempfile
    src = Path(src).expanduser()
    if src.is_file() and src.suffix == ".npz":
        if layer is None:
            m = re.search(r"layer_(\d+)", str(src))
            if not m:
                raise HeadscopeError(f"cannot tell the layer of {src}: give --layer")
            layer = int(m.group(1))
        import numpy as np
        try:
            npz = dict(np.load(src))
        except Exception as e:
            raise HeadscopeError(f"cannot read {src}: {str(e).splitlines()[0]}") from None
        _need(npz, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), src)
        d_in, F = npz["W_enc"].shape
        with tempfile.TemporaryDirectory() as tmp:
            write_tensors(Path(tmp) / WEIGHTS, {k: torch.from_numpy(np.ascontiguousarray(npz[k])).float()
                                               for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")})
            write_json(Path(tmp) / CFG, {
                "architecture": "jumprelu", "d_in": int(d_in), "d_sae": int(F), "apply_b_dec_to_input": False,
                "normalize_activations": "none", "reshape_activations": "hook_z",
                "metadata": {"sae_lens_version": _sae_lens_version(), "hook_name": f"blocks.{layer}.attn.hook_z",
                             "hook_head_index": None, "model_name": model.name, "dataset_path": str(src)}})
            sae = load_sae(tmp, model, layer=layer)
    elif src.is_dir():
        sae = load_sae(src, model, layer=layer)
    else:
        raise HeadscopeError(f"{src} is neither an SAE folder (cfg.json + {WEIGHTS}) nor a params.npz")
    save_sae(sae, dest)
    return sae
