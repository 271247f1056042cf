"""headscope: what does each attention head of a language model do?"""

from .errors import HeadscopeError

__version__ = "0.1.0"
__all__ = ["HeadscopeError", "__version__"]
