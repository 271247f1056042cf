"""docs/options.md is generated from the options dataclasses (scripts/options_doc.py): it must equal what the
script writes now, so a changed option (name, flag, type, default, help) cannot leave the docs behind."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("options_doc", ROOT / "scripts" / "options_doc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_options_reference_is_up_to_date():
    doc = _script()
    assert (ROOT / "docs" / "options.md").read_text() == doc.render(), \
        "docs/options.md is out of date: run scripts/options_doc.py"


def test_every_option_of_every_step_is_in_the_reference():
    import dataclasses

    from headscope import registry
    text = (ROOT / "docs" / "options.md").read_text()
    for ins in registry.instruments():
        for item in ins.stages + ins.commands:
            section = text.split(f"### `headscope {ins.name} {item.step}`", 1)[1].split("\n### ", 1)[0]
            for f in dataclasses.fields(item.options):
                assert f"| `{f.name}` |" in section, (item.name, f.name)


def test_env_defaults_are_documented_without_the_environment(monkeypatch):
    monkeypatch.setenv("HEADSCOPE_LLM", "someone-elses-model")
    assert "someone-elses-model" not in _script().render()
    assert os.environ["HEADSCOPE_LLM"] == "someone-elses-model"
