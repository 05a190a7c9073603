"""The one exception class for a user's wrong input (a config key, a path, a value): the scripts print its message
without a traceback and exit with status 2. Anything else is a bug and keeps its traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A wrong input, with a message that names it and the fix."""
