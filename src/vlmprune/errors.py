"""The one user-facing error type: its message names the problem and the fix."""


class VlmpruneError(ValueError):
    """Bad input or an unsupported request. The CLI prints the message on one line and exits 2."""
