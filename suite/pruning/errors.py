"""One exception type for bad input: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (model name, ratio, config key, missing data file, ...)."""
