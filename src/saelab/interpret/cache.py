"""Responses on disk, keyed by the hash of the request: a rerun never pays twice.

The key covers the endpoint and the request body (model, messages, sampling settings), so
the same prompt sent to another server or model is a different entry. Entries are written
atomically the moment a response arrives, so a run that crashes keeps what it paid for.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.atomic import read_json, sweep_dead_writers, write_text

log = logging.getLogger(__name__)


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


def completion_problem(response: Any) -> str | None:
    """What keeps `response` from being a usable chat completion (every choice a message
    with text), or None. A server can answer 200 with an error body, no choices, or a list:
    such an answer is retried, never cached."""
    if not isinstance(response, dict):
        return f"a JSON {type(response).__name__}, not an object"
    if response.get("error"):
        error = response["error"]
        return "an error body: " + str(error.get("message") if isinstance(error, dict)
                                       else error)[:200]
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices:
        return "no choices"
    for c in choices:
        message = c.get("message") if isinstance(c, dict) else None
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return "a choice without message text"
    return None


class ResponseCache:
    """Well-formed completions only: `put` refuses anything else, and `get` treats an entry
    that is not one (written by an older saelab that cached whatever came back) as missing,
    so it is asked again and overwritten."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.ignored: set[str] = set()  # poisoned entries met in this run
        if self.dir.is_dir():
            sweep_dead_writers(self.dir)

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        # A torn file from a killed writer reads as missing.
        response = read_json(self._path(key))
        if response is None:
            return None
        if problem := completion_problem(response):
            if key not in self.ignored:
                self.ignored.add(key)
                log.warning("ignoring cached response %s (%s): it will be requested again",
                            self._path(key), problem)
            return None
        return response

    def put(self, key: str, response: dict[str, Any]) -> None:
        if problem := completion_problem(response):
            raise ValueError(f"not caching a malformed response ({problem})")
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(response, ensure_ascii=False))
        self.ignored.discard(key)
