"""headscope: what does each attention head of a language model do?

The Python API (:mod:`headscope.api`)::

    from headscope import open_run
    run = open_run("runs/x", model="default")
    run.heads.score()
"""

from .errors import HeadscopeError

__version__ = "0.1.0"
__all__ = ["HeadscopeError", "Run", "open_run", "__version__"]


def __getattr__(name: str):  # the API imports torch: loaded on first use, so `import headscope` stays light
    if name in ("open_run", "Run"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'headscope' has no attribute '{name}'")
