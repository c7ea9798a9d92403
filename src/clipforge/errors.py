"""The exceptions clipforge raises for problems the user can fix.

:class:`ClipforgeError` is the base of every error whose message names the problem and the fix
(bad config, a directory in use, a diverged run, a full disk). ``clipforge`` on the command line
prints such an error as one line on stderr and exits with code 2; any other exception is a bug
and keeps its traceback. The subclasses also derive from the built-in exception that the same
problem raised before (``ValueError``, ``OSError``, ``RuntimeError``), so ``except ValueError``
written against older versions still catches them.
"""
from __future__ import annotations

import errno


class ClipforgeError(Exception):
    """A problem with the user's input, files or environment; the message says what and how to fix it."""


class ConfigError(ClipforgeError, ValueError):
    """An invalid configuration value, override or config file."""


class RunDirectoryError(ClipforgeError, ValueError):
    """A run's ``out_dir`` cannot be used (a file, under a file, not writable)."""


class MissingInputError(ClipforgeError, FileNotFoundError):
    """A file or directory the user named does not exist or is not what it should be."""


class CheckpointError(MissingInputError):
    """No usable checkpoint where one was asked for (``resume=...``)."""


class DiskFullError(ClipforgeError, OSError):
    """A write failed because the device has no space left; the message says where."""


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` is the OS saying that the device has no space (or quota) left."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(error: OSError, where: str, kept: str = "") -> DiskFullError:
    """A :class:`DiskFullError` for ``error`` raised while writing ``where``; ``kept`` says what is still intact."""
    err = DiskFullError(f"no space left on device while writing {where}{'; ' + kept if kept else ''}. "
                        "Free space on that disk (or choose another out_dir) and run again")
    err.errno = error.errno
    return err
