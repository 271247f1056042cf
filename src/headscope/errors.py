"""The one exception type users see: a clear, one-line message and a non-zero exit from the CLI."""


class HeadscopeError(Exception):
    """A user-facing error. The CLI prints ``headscope: error: <message>`` and exits with status 2."""
