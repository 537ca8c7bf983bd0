"""User-facing errors.

Every mistake a user can make (bad config key, missing file, malformed JSONL line, unknown device,
bad request) raises a TandemError subclass whose message is ONE line saying what is wrong and how
to fix it. The CLI prints it and exits 2, with no traceback; the server maps it to a 4xx.
`writing(path)` does the same for the file-system errors met while writing a command's output.

TrainingFailed is not a user mistake: training ran but cannot make progress (the guard keeps rolling
back). The CLI prints its one line and exits 3, which the supervisor does not retry.
"""

import errno
from contextlib import contextmanager


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


# The OSErrors a user's file system causes when tandem writes its output, as opposed to bugs.
_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENOSPC, errno.EDQUOT}


@contextmanager
def writing(path, flag: str = "--out"):
    """Turn a read-only folder, a missing permission, a file where a folder should be or a full
    disk met while writing `path` into one line naming the path; any other OSError propagates."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        hint = ("free some space or choose another " + flag if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                else f"choose a {flag} you can write to")
        raise TandemError(f"cannot write {exc.filename or path} ({exc.strerror}); {hint}") from None
