"""Errors a user can act on: the message names the problem and the fix."""


class SaelabError(RuntimeError):
    """A stage cannot do its job; the message says why and what to do."""
