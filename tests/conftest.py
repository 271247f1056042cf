"""Shared fixtures: tiny random models of every family, a saved local GPT-2-style checkpoint, and the
real embedded default model for tests marked slow. Caches go to a per-session temporary folder unless
HEADSCOPE_CACHE is set (CI sets it so the default model is converted once)."""

import os

import pytest

from headscope.testing import FAMILIES, save_tiny_model, tiny_model


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    if "HEADSCOPE_CACHE" not in os.environ:
        os.environ["HEADSCOPE_CACHE"] = str(tmp_path_factory.mktemp("headscope-cache"))
    yield


@pytest.fixture(params=FAMILIES)
def any_tiny(request):
    """A tiny random model of each supported family."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    """A local GPT-2-style HF checkpoint directory (tiny, random)."""
    return save_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def default_model():
    """The real embedded default model (SmolLM2-135M-Instruct); only for tests marked slow."""
    from headscope.models import load_model
    return load_model("default")


@pytest.fixture(scope="session")
def demo_small_run(default_model, tmp_path_factory):
    """``headscope demo --small`` (configs/ci.toml) on the real default model, run once per session:
    (run folder, the study record). Read by the demo test and the demo atlas's browser test."""
    from headscope.study import builtin_config, load_config, run_study
    out = tmp_path_factory.mktemp("demo-small") / "demo"
    rec = run_study(load_config(builtin_config("ci")), out=out, model=default_model)
    return out, rec
