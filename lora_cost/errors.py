"""The one exception type the CLI turns into a one-line message and exit code 2."""


class LoraCostError(ValueError):
    """Bad input: an unknown model, an impossible rank, a malformed file, ..."""
