"""Writing results without ever leaving a half-written file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` as indented JSON to `path` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return path


def write_dir(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Fill a directory atomically: `write(tmp)` fills a temporary sibling, which is then renamed to
    `path`. An existing `path` is moved aside first and removed only once the new one is in place (and
    put back if the rename fails); a failing `write` leaves neither a half-written `path` nor the
    temporary directory."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        write(tmp)
        if not out.exists():
            os.rename(tmp, out)
            return out
        old = tmp.with_name(tmp.name[: -len(".tmp")] + ".old")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
