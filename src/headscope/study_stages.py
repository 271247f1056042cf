"""Adapters that turn a study config's plain TOML options into the instruments' stage functions'
arguments (dataclass configs, head lists). Each is ``run_*(model, run, **options) -> dict``."""

from __future__ import annotations

from dataclasses import fields

from .errors import HeadscopeError


def _dataclass(cls, options: dict | None, what: str):
    options = dict(options or {})
    names = {f.name for f in fields(cls)}
    bad = set(options) - names
    if bad:
        raise HeadscopeError(f"[{what}] unknown option(s) {', '.join(sorted(bad))}; valid: {', '.join(sorted(names))}")
    return cls(**options)


def run_lens_train(model, run, heads: str = "all", layers: str | list[int] | None = "-3", lens: dict | None = None,
                   train: dict | None = None, corpus: str | None = None, progress: bool = True) -> dict:
    """Train lenses (``headscope.lens.train.run_train``) for ``heads`` ('all', '0,3', or '20.3,21.*') of
    ``layers`` ('all', '-3', '10-13' or a list). ``lens``: LensConfig fields; ``train``: TrainConfig fields;
    ``corpus``: the study's corpus unless ``train`` names one."""
    from .cli import parse_layers
    from .lens.lenses import LensConfig, parse_sites
    from .lens.train import TrainConfig, run_train
    if isinstance(layers, str):
        layers = parse_layers(layers, model.n_layers)
    train = dict(train or {})
    if corpus is not None:
        train.setdefault("corpus", corpus)
    sites = parse_sites(heads, model) if "." in str(heads) else parse_sites(heads, model, layers=layers)
    return run_train(model, run, sites, _dataclass(LensConfig, lens, "lens.lens"),
                     _dataclass(TrainConfig, train, "lens.train"), progress=progress)


def sae_name(config: dict) -> str | None:
    """The SAE name the [sae] table trains (``name``, else ``L<layer>``)."""
    t = config.get("sae")
    if not isinstance(t, dict):
        return None
    if t.get("name"):
        return str(t["name"])
    return f"L{t['layer']}" if "layer" in t else None
