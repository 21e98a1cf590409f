"""Small helpers shared by the library, its examples and its benchmarks."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable


def atomic_write(path: str, write: Callable[[str], object]) -> None:
    """Create `path` atomically: `write(tmp)` fills a temporary file beside it, then `os.replace`.

    The temporary file keeps `path`'s extension (`model.save` checks it) and
    gets the usual permissions; on any error it is removed and `path` is left
    as it was.

    Example:

    >>> atomic_write("results.json", lambda tmp: open(tmp, "w").write("{}"))  # doctest: +SKIP
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
