"""Training checkpoints: written atomically, loaded only when the run's fingerprint matches."""
from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.atomic import atomic_path

log = logging.getLogger(__name__)

FILE = "checkpoint.pt"


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


def save(ckpt_dir: Path, state: dict[str, Any]) -> Path:
    """torch.save to a temp file, fsync, then rename: a kill leaves the old file or the new."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / FILE
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as fh:
        # Through a Python file object a full disk surfaces as OSError(ENOSPC), not as
        # torch's opaque RuntimeError from its own writer.
        torch.save(state, fh)
    return path


def load(ckpt_dir: Path | None, fp: str) -> dict[str, Any] | None:
    """The latest checkpoint if it belongs to this run (same fingerprint), else None."""
    if ckpt_dir is None:
        return None
    path = Path(ckpt_dir) / FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated file cannot come from save(); say so and start over
        log.warning("ignoring unreadable checkpoint %s (%s); starting fresh", path, e)
        return None
    if state.get("fingerprint") != fp:
        log.info("checkpoint %s is from a different configuration; starting fresh", path)
        return None
    return state
