"""Write a whole file or nothing: readers never see a half-written manifest, card or work file."""

from __future__ import annotations

import os
from pathlib import Path


def temp_name(name: str) -> str:
    """Hidden name, unique to this process, to write `name` under before renaming it into place."""
    return f".{name}.tmp-{os.getpid()}"


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, flush it to disk, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(path.name))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
