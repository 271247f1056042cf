"""The tiny study config the tests build a run from: small options for every stage a test needs, on a
tiny random model (:func:`headscope.testing.tiny_model`), as TOML text for ``headscope study``."""

from __future__ import annotations

import json

TINY_TABLES: dict[str, dict] = {
    "heads.score": {"n_seqs": 4, "half_len": 8, "prefix_examples": 4, "prefix_lengths": [1, 2]},
    "lens.train": {"layers": "2", "heads": "0,1", "tokens": 256, "init_tokens": 256, "batch_size": 4},
    "lens.eval": {"tokens": 256},
    "sae.train": {"layer": 1, "n_tokens": 1024, "batch_size": 256, "k": 8},
    "neurons.find": {"per_layer": 3, "require_space": False, "min_chars": 1},
    "neurons.mine": {"top_k": 4, "top_k_test": 2, "max_tokens": 2000},
}
"""Stage → the options of its table in the tiny study (a few seconds each on a tiny model)."""


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(v) if isinstance(v, str) else repr(v)


def tiny_study(*stages: str, study: dict | None = None, tables: dict[str, dict] | None = None) -> str:
    """TOML text of a study running ``stages`` (names of :data:`TINY_TABLES`) with their tiny options.
    ``tables`` adds or overrides keys by table name (``{"lens.train": {"tokens": 512}}``, ``{"sae": {"name":
    "L1"}}`` for an instrument's shared keys, ``{"atlas": {}}`` for the atlas), in the order given after
    ``stages``; ``study`` is the ``[study]`` table."""
    tables = tables or {}
    out = []
    if study is not None:
        out.append("[study]")
        out += [f"{k} = {_value(v)}" for k, v in study.items()]
    for name in list(stages) + [k for k in tables if k not in stages]:
        out.append(f"[{name}]")
        out += [f"{k} = {_value(v)}" for k, v in {**TINY_TABLES.get(name, {}), **tables.get(name, {})}.items()]
    return "\n".join(out) + "\n"
