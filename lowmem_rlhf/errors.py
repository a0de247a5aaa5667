"""Errors a user can cause and fix: printed as one line by the CLI, never with a traceback."""


class UserError(Exception):
    """A problem in a recipe, a data file, a path or the machine's capacity that the user can fix.

    The message is one sentence naming the file, key or row and saying what to do.
    """
