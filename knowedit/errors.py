"""The one base class of knowedit's own errors.

Every error that describes the user's input or environment (a bad prompt, a
damaged checkpoint or ledger, an unknown edit id, a busy ledger, ...) is a
:class:`KnoweditError`; the command line shows those as one line and exits 1.
Most also stay :class:`ValueError` subclasses, as they always were, so code
that catches ``ValueError`` keeps working.
"""

from __future__ import annotations


class KnoweditError(Exception):
    """A problem with the input or the environment, explained by its message."""


class OptionError(KnoweditError, ValueError):
    """An option, setting or argument whose value is not allowed; the message names it."""


class FileAccessError(KnoweditError, OSError):
    """A file or directory the user named that cannot be read or written
    (missing, a directory where a file was meant, no permission, ...)."""


def file_problem(path: object, err: OSError, doing: str = "read") -> FileAccessError:
    """A :class:`FileAccessError` naming ``path`` and what went wrong, for ``raise ... from err``."""
    if isinstance(err, FileNotFoundError):
        what = "does not exist"
    elif isinstance(err, IsADirectoryError):
        what = "is a directory, not a file"
    elif isinstance(err, NotADirectoryError):
        what = "has a parent that is not a directory"
    elif isinstance(err, PermissionError):
        what = f"cannot be {'read' if doing == 'read' else 'written'}: permission denied"
    else:
        what = f"cannot be {'read' if doing == 'read' else 'written'}: {err.strerror or err}"
    return FileAccessError(f"{path} {what}")
