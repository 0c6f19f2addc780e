"""Exception types. Every message says what was wrong and how to fix it."""


class PathlensError(ValueError):
    """Bad input to a pathlens call; the message names the input and the fix."""
