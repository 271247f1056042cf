"""An SAE folder ready to upload as a Hugging Face model repository, in SAELens' layout (files only).

SAELens loads an SAE from a Hugging Face repo as ``SAE.from_pretrained(repo_id, sae_id)``, where
``sae_id`` is a folder of the repo holding ``cfg.json``, ``sae_weights.safetensors`` and (optional)
``sparsity.safetensors`` — the files ``sae_lens.training.upload_saes_to_huggingface`` uploads, and the
same files headscope already writes under ``RUN/sae/<name>/`` (SAELens format, see
:mod:`headscope.sae.io`). This writes::

    OUT/README.md                    model card (front matter: library_name: saelens, tags, base_model)
    OUT/<sae_id>/cfg.json            sae_id = the hook name, e.g. blocks.14.attn.hook_z
    OUT/<sae_id>/sae_weights.safetensors
    OUT/<sae_id>/sparsity.safetensors   when `headscope sae eval` wrote it
    OUT/<sae_id>/explanations.json   feature explanations and their scores, when explained

The model card states what the SAE was trained on, its evaluation (L0, explained variance, CE/KL
recovered) and its explanation scores beside their shuffled baselines, and how to load it. Upload it
yourself (``huggingface-cli upload USER/REPO OUT``); nothing is sent from here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import HeadscopeError
from ..runs import RunDir, building_folder, read_json
from .options import HFOptions

FILES = ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _ci(m: dict | None) -> str:
    if not m or m.get("mean") is None:
        return "n/a"
    ci = m.get("ci")
    return f"{m['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def model_card(cfg: dict, sae_id: str, opts: HFOptions, ident: dict, ev: dict | None, train: dict | None,
               scores: list[dict]) -> str:
    meta = cfg.get("metadata", {})
    base = meta.get("model_name") or ident.get("model", "")
    layer = meta.get("headscope", {}).get("layer")
    lines = ["---", "library_name: saelens", f"license: {opts.license}",
             "tags:", "- sparse-autoencoder", "- saelens", "- headscope", "- attention-output"]
    if base and "/" in str(base):
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# Attention-output SAE for {base}, layer {layer}", "",
              f"A sparse autoencoder on the concatenated attention-head outputs (`hook_z`) of layer {layer} of "
              f"`{base}`, trained with [headscope](https://github.com/) and saved in SAELens' format.", "",
              "| | |", "|---|---|",
              f"| hook | `{meta.get('hook_name', sae_id)}` |", f"| architecture | {cfg.get('architecture')} |",
              f"| d_in | {cfg.get('d_in')} |", f"| d_sae | {cfg.get('d_sae')} |"]
    if cfg.get("k"):
        lines.append(f"| k (TopK) | {cfg.get('k')} |")
    if train:
        tc = train.get("config", {})
        lines += [f"| training tokens | {_fmt(tc.get('n_tokens'))} |", f"| corpus | {tc.get('corpus', 'default')} |",
                  f"| context size | {_fmt(tc.get('seq_len'))} |"]
    if ev:
        lines += ["", "## Evaluation (held-out tokens)", "", "| metric | value |", "|---|---|"]
        for k in ("l0", "fve", "nmse", "ce_recovered_zero", "ce_recovered_mean", "kl_recovered_zero",
                  "kl_recovered_mean", "dead_frac", "dense_frac", "n_tokens"):
            if k in ev:
                lines.append(f"| {k} | {_fmt(ev[k])} |")
    if scores:
        lines += ["", "## Feature explanations", "",
                  "Scores of the explanations in `explanations.json` on held-out contexts, beside the same judge "
                  "given another feature's explanation (shuffled baseline); mean over features, 95 % bootstrap CI.", "",
                  "| explanations | judge | scorer | balanced accuracy | shuffled | features |", "|---|---|---|---|---|---|"]
        for s in scores:
            for kind in ("detection", "fuzzing"):
                if kind in s["summary"]:
                    k = s["summary"][kind]
                    lines.append(f"| {s['explanations']} | {s['judge']} | {kind} | {_ci(k.get('balanced_accuracy'))} | "
                                 f"{_ci(k.get('shuffled_balanced_accuracy'))} | {k.get('units')} |")
    lines += ["", "## Loading", "", "```python", "from sae_lens import SAE", "",
              f'sae = SAE.from_pretrained("{opts.repo_id}", "{sae_id}")  # or SAE.load_from_disk("{sae_id}")',
              "```", "", "The SAE reads `hook_z` of shape [batch, pos, n_heads, d_head] "
              "(`reshape_activations: hook_z` in `cfg.json`).", ""]
    return "\n".join(lines)


def cmd_export(run: RunDir, opts: HFOptions) -> int:
    """``headscope export hf``."""
    r = export_hf(run, Path(opts.to), opts)
    print(f"{', '.join(r['files'])} + README.md -> {r['folder']} (sae_id {r['sae_id']})")
    return 0


def export_hf(run: RunDir, out: Path, opts: HFOptions) -> dict:
    """Write the repository folder ``out`` (see the module docstring); it must not exist yet."""
    from ..explain.features import features_dir
    root = run / "sae"
    names = sorted(p.name for p in root.iterdir() if (p / "cfg.json").is_file()) if root.is_dir() else []
    if opts.sae:
        if opts.sae not in names:
            raise HeadscopeError(f"no SAE '{opts.sae}' in {root} (have: {', '.join(names) or 'none'})")
        name = opts.sae
    elif len(names) == 1:
        name = names[0]
    else:
        raise HeadscopeError(f"{len(names)} SAEs in {root} ({', '.join(names) or 'none'}): choose one with --sae")
    out = Path(out)
    if out.exists():
        raise HeadscopeError(f"{out} exists: choose a new folder for the repository")
    folder = root / name
    cfg = read_json(folder / "cfg.json")
    sae_id = cfg.get("metadata", {}).get("hook_name") or name
    if "/" in sae_id or sae_id.startswith("."):
        raise HeadscopeError(f"SAE {name}: its hook name {sae_id!r} cannot be a folder name")
    with building_folder(out, "--to") as tmp:
        (tmp / sae_id).mkdir()
        copied = []
        for f in FILES:
            if (folder / f).is_file():
                shutil.copy2(folder / f, tmp / sae_id / f)
                copied.append(f)
        scores = []
        fd = features_dir(run, name)
        expl = {}
        for ef in sorted(fd.glob("explanations_*.json")):
            expl[ef.stem[len("explanations_"):]] = read_json(ef)["features"]
        for sf in sorted(fd.glob("scores_*_by_*.json")):
            sc = read_json(sf)
            scores.append({"explanations": sc["explanations"], "judge": sc.get("scorer", {}).get("backend"),
                           "probabilities": sc.get("probabilities"), "summary": sc.get("summary", {})})
        if expl:
            (tmp / sae_id / "explanations.json").write_text(json.dumps({"explanations": expl, "scores": scores}))
            copied.append("explanations.json")
        ev = read_json(folder / "eval.json") if (folder / "eval.json").is_file() else None
        train = read_json(folder / "train.json") if (folder / "train.json").is_file() else None
        (tmp / "README.md").write_text(model_card(cfg, sae_id, opts, run.model_identity, ev, train, scores))
    return {"folder": str(out), "sae_id": sae_id, "files": copied}
