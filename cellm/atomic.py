"""Atomic file writes: temp file in the target's directory, fsync, then rename over the target.

A reader sees either the old file or the complete new one, never a partial write; on any exception
the temp file is removed and the target is untouched.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def atomic_write(path: str | os.PathLike, fill: Callable[[IO[Any]], None], *, binary: bool = True) -> Path:
    """Write ``path`` atomically; ``fill(f)`` writes the content into the open temp file ``f``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, default: Callable[[Any], Any] | None = None,
               newline: bool = False) -> Path:
    """Write ``obj`` as JSON (sorted keys) atomically; ``newline`` ends the file with one."""
    import json

    def fill(f: IO[Any]) -> None:
        json.dump(obj, f, indent=indent, sort_keys=True, default=default)
        if newline:
            f.write("\n")

    return atomic_write(path, fill, binary=False)
