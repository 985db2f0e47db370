"""Training checkpoints: written atomically under a name holding their sha256, the last two
kept, loaded only when sound and when the run's fingerprint matches."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.atomic import sha256_file, temp_name

log = logging.getLogger(__name__)

_NAME = re.compile(r"checkpoint-(\d{9})-([0-9a-f]{64})\.pt")
KEEP = 2  # checkpoints kept: the newest and the one before it


def fingerprint(spec: dict[str, Any]) -> str:
    """Hash of everything that determines the training trajectory."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _name(step: int, sha: str) -> str:
    return f"checkpoint-{step:09d}-{sha}.pt"


def _parse(path: Path) -> tuple[int, str] | None:
    """(step, sha256) from a checkpoint's name, or None for other files."""
    m = _NAME.fullmatch(path.name)
    return (int(m[1]), m[2]) if m else None


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """The checkpoints in `ckpt_dir`, newest first."""
    found = [(p, _parse(p)) for p in Path(ckpt_dir).glob("checkpoint-*.pt")]
    return [p for p, parsed in sorted((x for x in found if x[1]), key=lambda x: -x[1][0])]


def latest(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint file (not checked), or None."""
    found = _checkpoints(ckpt_dir) if Path(ckpt_dir).is_dir() else []
    return found[0] if found else None


def save(ckpt_dir: Path, state: dict[str, Any]) -> Path:
    """torch.save to a temp file, fsync, then rename to a name holding the step and the
    file's sha256: a kill leaves the old files or the new, and a reader can tell a damaged
    file from a good one. The two newest are kept, so a damaged one has a predecessor."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(ckpt_dir / "checkpoint.pt")
    try:
        with open(tmp, "wb") as fh:
            # Through a Python file object a full disk surfaces as OSError(ENOSPC), not as
            # torch's opaque RuntimeError from its own writer.
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        path = ckpt_dir / _name(int(state["state"]["step"]), sha256_file(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: leave no half file taking space
        raise
    for old in _checkpoints(ckpt_dir)[KEEP:]:
        old.unlink(missing_ok=True)
    return path


def _set_aside(path: Path, why: str) -> None:
    bad = path.with_name(path.name + ".corrupt")
    os.replace(path, bad)
    log.warning("checkpoint %s is damaged (%s): set aside as %s; resuming from the one "
                "before it, if any", path.name, why, bad.name)


def load(ckpt_dir: Path | None, fp: str) -> dict[str, Any] | None:
    """The newest sound checkpoint if it belongs to this run (same fingerprint), else None.
    A damaged one (its sha256 differs from its name's, or it does not unpickle) is set
    aside with a warning and the previous one is tried."""
    if ckpt_dir is None or not Path(ckpt_dir).is_dir():
        return None
    for path in _checkpoints(Path(ckpt_dir)):
        _, want = _parse(path)
        if sha256_file(path) != want:
            _set_aside(path, "sha256 differs from the one it was saved with")
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a sound hash makes this a foreign file
            _set_aside(path, f"unreadable: {str(e)[:200]}")
            continue
        if state.get("fingerprint") != fp:
            log.info("checkpoints in %s are from a different configuration; starting fresh",
                     ckpt_dir)
            for other in _checkpoints(Path(ckpt_dir)):  # else they would outrank ours
                other.unlink()
            return None
        return state
    return None
