"""User-facing errors.

Every mistake a user can make (bad config key, missing file, malformed JSONL line, unknown device,
bad request) raises a TandemError subclass whose message is ONE line saying what is wrong and how
to fix it. The CLI prints it and exits 2, with no traceback; the server maps it to a 4xx.

TrainingFailed is not a user mistake: training ran but cannot make progress (the guard keeps rolling
back). The CLI prints its one line and exits 3, which the supervisor does not retry.
"""


class TandemError(Exception):
    """Base class: a mistake in the user's input, reported as one line."""


class ConfigError(TandemError):
    """A config key, value or preset is wrong."""


class DataError(TandemError):
    """A dataset file is missing or malformed (the message names file:line)."""


class DeviceError(TandemError):
    """A device or dtype is not available here."""


class ModelError(TandemError):
    """A model or run folder is missing, incomplete or of an unknown kind."""


class CheckpointError(TandemError):
    """A checkpoint is missing, corrupt or does not match the run."""


class TrainingFailed(Exception):
    """Training cannot make progress (e.g. every update is non-finite); CLI exit status 3."""

    exit_code = 3


class CorruptionError(TrainingFailed):
    """The corruption detector keeps rolling back the same step: not a transient fault."""
