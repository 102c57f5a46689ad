"""Errors a user can cause; the CLI prints them as one line, never a traceback."""


class MaskpropError(ValueError):
    """Bad input or configuration, with a message meant for the person who gave it."""
