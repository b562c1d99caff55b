"""The data layer's user errors: each names the file or folder it is about, in one line.

``ShardError`` is the family the entry points print without a traceback; ``WriteError`` (a
``ShardError``) is a file the project could not write -- disk full, quota, a read-only folder.
"""

from __future__ import annotations

import errno
import os


class ShardError(ValueError):
    """A shard or dataset folder that breaks the data contract (or cannot be written); the message names the file."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # pickled with its two arguments (raised in a child process, re-raised by the parent)
        return type(self), (self.path, self.problem)


class WriteError(ShardError):
    """A file the project writes (shard, cache, manifest, experts) could not be written; nothing is left behind."""


# errno values that mean "this write cannot succeed here" (as opposed to a read of a broken source)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def reason(exc: BaseException) -> str:
    """A one-line reason for an OS-level failure: the errno's text when there is one (HDF5 messages span lines)."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0:
        return f"{os.strerror(code)} [errno {code}]"
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__
