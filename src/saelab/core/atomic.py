"""Write-then-rename: a killed process or a full disk leaves the old file or the new, never half.
Also the readers that go with it: torn-safe JSON, a file's sha256."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterator


def temp_name(path: Path) -> Path:
    # The writer's pid in the name lets a later run tell a dead writer's leftovers from a
    # live writer's file (queued experiments can share a directory).
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` on success, delete it on failure."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: leave no half file taking space
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: str | Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path) -> Any | None:
    """The file's JSON, or None when it is missing or torn (a killed writer, a full disk)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def sweep_dead_writers(directory: str | Path, pattern: str = "**/.*.tmp") -> int:
    """Delete temp files left by writers that were killed between writing and renaming."""
    removed = 0
    for tmp in Path(directory).glob(pattern):
        parts = tmp.name.rsplit(".", 3)  # .<name>.<pid>.<tid>.tmp
        if len(parts) == 4 and parts[1].isdigit() and not _alive(int(parts[1])):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed
