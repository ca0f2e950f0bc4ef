"""Errors that mean "the user asked for something invalid", as opposed to bugs.

The command line prints a :class:`ConfigError` as one line naming the file and field, with no traceback.
"""


class ConfigError(ValueError):
    """An invalid configuration or input; the message names the file, table and field at fault."""
