"""Every error m3-rag raises on purpose, in one place.

Each subclasses the builtin a caller would already catch (``ValueError`` for bad input or a
bad file, ``RuntimeError`` for a state conflict), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "IndexFormatError",
    "IndexMismatchError",
    "MergeWarning",
    "WriteConflictError",
]


class IndexFormatError(ValueError):
    """The directory is not a readable m3-rag index: wrong format or version, a missing,
    corrupt or tampered file (the message names it), or inconsistent contents."""


class IndexMismatchError(ValueError):
    """A readable index that was built for another model or other settings than the ones
    it is opened with (the message names the setting and how to open it)."""


class CheckpointError(ValueError):
    """A checkpoint directory exists but one of its files is unreadable or inconsistent."""


class WriteConflictError(RuntimeError):
    """Another writer committed to the index since this handle read it: open it again."""


class MergeWarning(RuntimeWarning):
    """A merge that a committed write started failed (e.g. a full disk: ``OSError``
    ENOSPC). The write stands; nothing of the merge was committed (its partial segment is
    removed), and the merge is tried again by the next write or
    :meth:`~m3_rag.backends.LocalBackend.compact`.
    Turn it into an error with ``warnings.simplefilter("error", MergeWarning)``, or log it
    with ``logging.captureWarnings(True)``."""
