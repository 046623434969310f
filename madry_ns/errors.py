"""The one exception type for problems the user can fix (bad config, data, files).

Scripts catch `UserError` at the top and print its message without a traceback; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An input problem, reported as one paragraph: what, where, what was expected."""

    exit_code = 2


class ConfigError(UserError):
    """Invalid configuration file, key, type or value."""


class DataError(UserError):
    """Missing, malformed or unsafe dataset files."""


class CheckpointError(UserError):
    """Missing, truncated or incompatible checkpoint."""


class AttackFileError(UserError):
    """An attack file (attack.npy) that is not a valid perturbation of the test set."""


class DownloadError(UserError):
    """A download that failed (no network, unreachable host) or an unusable archive."""


class UsageError(UserError):
    """A command line whose parts do not fit together (flags that exclude each other, a
    missing argument); reported with the command's usage line, as argparse's own errors."""
