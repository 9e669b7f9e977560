"""Errors that the command line reports as one line and a non-zero exit, without a traceback."""


class GemBenchError(Exception):
    """Base class: the message is meant for the user, complete on one line."""


class ConfigError(GemBenchError, ValueError):
    """A bad value in the configuration: names the value and the valid choices."""


class DataError(GemBenchError):
    """A missing or malformed data file: names the path and how to point elsewhere."""
