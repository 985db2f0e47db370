"""Responses on disk, keyed by the hash of the request: a rerun never pays twice.

The key covers the endpoint and the request body (model, messages, sampling settings), so
the same prompt sent to another server or model is a different entry. Entries are written
atomically the moment a response arrives, so a run that crashes keeps what it paid for.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.atomic import read_json, sweep_dead_writers, write_text


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_key(body: dict[str, Any], base_url: str = "") -> str:
    """sha256 of the canonical request JSON (endpoint + chat-completions body)."""
    payload = {"base_url": base_url.rstrip("/"), "body": body}
    return hashlib.sha256(canonical(payload).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Request:
    """One chat-completions request; its key doubles as the Batch API custom_id."""

    key: str
    body: dict[str, Any]

    @classmethod
    def make(cls, body: dict[str, Any], base_url: str = "") -> "Request":
        return cls(request_key(body, base_url), body)

    def batch_line(self) -> str:
        return canonical({"custom_id": self.key, "method": "POST",
                          "url": "/v1/chat/completions", "body": self.body})


class ResponseCache:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if self.dir.is_dir():
            sweep_dead_writers(self.dir)

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        # A torn file from a killed writer reads as missing.
        return read_json(self._path(key))

    def put(self, key: str, response: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(response, ensure_ascii=False))
