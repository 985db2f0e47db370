"""Manifests that protect themselves: a sha256 over their own content.

A manifest lists the sha256 of every data file, but nothing guarded the manifest itself:
multiplying its `scale` by 10 or editing `n_tokens` passed every check. `seal` adds the
hash of the manifest's canonical JSON (every field but the seal); `seal_problem` tells a
reader whether any field changed since. It is a checksum, not a signature: it catches
bit rot, a bad copy and a hand edit, not someone who recomputes it on purpose.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

SEAL = "manifest_sha256"


def _digest(obj: dict[str, Any]) -> str:
    body = {k: v for k, v in obj.items() if k != SEAL}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` with its self-hash (the last field)."""
    return {**{k: v for k, v in obj.items() if k != SEAL}, SEAL: _digest(obj)}


def seal_problem(obj: Any, name: str) -> str | None:
    """What is wrong with the self-hash of manifest `obj` (named `name`), or None."""
    if not isinstance(obj, dict):
        return f"{name}: not a JSON object"
    if SEAL not in obj:
        return (f"{name}: has no {SEAL} (written by an older saelab, or edited), so its "
                "fields cannot be trusted")
    if obj[SEAL] != _digest(obj):
        return f"{name}: edited or damaged since it was written ({SEAL} does not match)"
    return None
